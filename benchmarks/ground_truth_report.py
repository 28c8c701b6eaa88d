"""benchmarks.ground_truth's table (OUT/table.md) and figure (OUT/mcc_ev_l0.png: MCC and
explained variance against L0, both libraries, one marker per family, one panel row per
budget)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIELDS = ("l0", "mcc", "f1", "ev", "dead", "uniqueness", "wall_seconds")
MARKERS = {"topk": "o", "batchtopk": "s", "matryoshka": "^", "jumprelu": "D"}
COLORS = {"ksae_jax": "tab:blue", "saelens": "tab:orange"}


def table(summary: dict) -> str:
    """The comparison rows, then the short-budget variants, as markdown."""
    head = ["system", "arch", "variant", "k", "steps x batch", *FIELDS]
    lines = [f"SynthSAEBench at {summary['features']} features in d = {summary['d']}; "
             f"random-decoder MCC {summary['random_decoder_mcc']:.3f}. wall_seconds: a "
             "ksae_jax run trains every k at once (its wall time shared among them).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(summary["rows"], key=lambda r: (r["steps"], "variant" in r, r["arch"],
                                                  r["k"] or 0, r.get("l0_coef", 0),
                                                  r.get("variant", ""), r["system"]))
    for r in rows:
        k = str(r["k"]) if r["k"] else f"l0_coef {r['l0_coef']:g}"
        cells = [r["system"], r["arch"], r.get("variant", "-"), k,
                 f"{r['steps']} x {r['batch']}"]
        cells += [f"{r[f]:.1f}" if f in ("l0", "wall_seconds") else f"{r[f]:.3f}"
                  for f in FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(summary: dict, path) -> None:
    budgets = sorted({(r["steps"], r["batch"]) for r in summary["rows"]})
    fig, axes = plt.subplots(len(budgets), 2, figsize=(10, 3.6 * len(budgets)), squeeze=False)
    for (steps, batch), (ax_mcc, ax_ev) in zip(budgets, axes):
        for r in summary["rows"]:
            if (r["steps"], r["batch"]) != (steps, batch) or "variant" in r:
                continue
            style = dict(marker=MARKERS.get(r["arch"], "x"), color=COLORS[r["system"]], s=40)
            ax_mcc.scatter(r["l0"], r["mcc"], **style)
            ax_ev.scatter(r["l0"], r["ev"], **style)
        ax_mcc.axhline(summary["random_decoder_mcc"], color="gray", ls=":", lw=1)
        ax_mcc.set(xlabel="L0", ylabel="MCC", title=f"{steps} steps x {batch} rows: MCC")
        ax_ev.set(xlabel="L0", ylabel="explained variance", title="explained variance")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=s) for s, c in COLORS.items()]
    drawn = {r["arch"] for r in summary["rows"]}
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=a)
                for a, m in MARKERS.items() if a in drawn]
    handles.append(plt.Line2D([], [], color="gray", ls=":", label="random decoder"))
    axes[0, 1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(c, summary: dict) -> None:
    (c.out / "table.md").write_text(table(summary))
    figure(summary, c.out / "mcc_ev_l0.png")
