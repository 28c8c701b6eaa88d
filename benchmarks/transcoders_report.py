"""The table and the figure of benchmarks.transcoders: per layer and k, held-out FVU and the
spliced delta_loss of ksae_jax's transcoders beside sparsify's (matched settings, its
defaults), skip transcoders beside sparsify's skip option, and the replacement models
(every layer replaced at once) where the summary holds them."""
from __future__ import annotations

from pathlib import Path

SYSTEMS = [("ksae_jax", "transcoder"), ("sparsify", "transcoder"),
           ("sparsify_defaults", "transcoder"), ("ksae_jax", "skip-transcoder"),
           ("sparsify", "skip-transcoder"), ("ksae_jax", "clt")]


def markdown(rows: list[dict]) -> str:
    by = {(r["system"], r["arch"], r["layer"], r["k"]): r for r in rows if "layer" in r}
    head = " | ".join(f"{s} {a}" for s, a in SYSTEMS)
    lines = [f"| layer | k | FVU: {head} | delta_loss: {head} |",
             "|---|---:|" + "---:|" * (2 * len(SYSTEMS))]
    keys = sorted({(r["layer"], r["k"]) for r in rows if "layer" in r})
    for layer, k in keys:
        cells = [[f"{by[(s, a, layer, k)][f]:.4f}" if (s, a, layer, k) in by else "-"
                  for s, a in SYSTEMS] for f in ("fvu", "delta_loss")]
        lines.append(f"| {layer} | {k} | " + " | ".join(cells[0] + cells[1]) + " |")
    replaced = [r for r in rows if "replacement_delta_loss" in r]
    if replaced:
        lines += ["", "| replacement model (every layer replaced) | k | L0 per layer | "
                      "delta_loss | KL |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['system']} {r['arch']} | {r['k']} | {r['l0']:.1f} | "
                  f"{r['replacement_delta_loss']:.4f} | {r['replacement_kl']:.4f} |"
                  for r in replaced]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    """delta_loss against L0: each layer's MLP replaced alone (left), every layer at once
    (right, where measured)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (one, every) = plt.subplots(1, 2, figsize=(9, 3.6))
    groups: dict = {}
    for r in rows:  # (system, arch, one layer or every layer) -> points
        alone = "layer" in r
        groups.setdefault((r["system"], r["arch"], alone), []).append(
            (r["l0"], r["delta_loss"] if alone else r["replacement_delta_loss"]))
    for i, (system, arch) in enumerate(SYSTEMS):
        for ax, alone, style in ((one, True, "o"), (every, False, "o-")):
            pts = sorted(groups.get((system, arch, alone), []))
            if pts:
                ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{system} {arch}",
                        alpha=0.7 if alone else 1.0)
    one.set_title("one layer's MLP replaced")
    every.set_title("every layer's MLP replaced")
    for ax in (one, every):
        ax.set_xlabel("L0 per layer")
        ax.set_yscale("log")
    one.set_ylabel("delta loss (nats/token)")
    one.legend(fontsize=6)
    every.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(c, rows: list[dict]) -> None:
    (c.out / "table.md").write_text(markdown(rows))
    figure(rows, c.out / "replacement.png")
    print(markdown(rows))
