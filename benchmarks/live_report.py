"""The tables and the figure of benchmarks.live: sparsify's coders judged as ksae_jax judges its
own (held-out FVU, L0 and dead latents on the same held-out activations, dead over the
training window from sparsify's own counters, the LM loss with the reconstruction spliced in
at the same hookpoint on the same held-out contexts), beside ksae_jax's metrics.json."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ksae_jax.files import write_json


def peer_rows(c, system: str, k: int, peer: dict, hookpoints: list[str], lm, held) -> list[dict]:
    """One row per hookpoint of one sparsify run (one k)."""
    import torch
    from sparsify import SparseCoder

    from benchmarks.vs_sparsify import torch_replacement
    from ksae_jax.lm.splice import SpliceEval, scores

    state = torch.load(Path(peer["folder"]) / "rank_0_state.pt", weights_only=True)
    rows = []
    for h, name in enumerate(hookpoints):
        theirs = f"h.{name.split('.')[-1]}"  # resid_post.L is sparsify's h.L (GPT-2)
        coder = SparseCoder.load_from_disk(Path(peer["folder"]) / theirs, device="cpu")
        x = torch.from_numpy(held[h])
        with torch.no_grad():
            enc = coder.encode(x)
            recon = coder.decode(enc.top_acts, enc.top_indices)
        fired = np.zeros(coder.num_latents, bool)
        fired[enc.top_indices[enc.top_acts > 0].numpy()] = True
        xd = held[h].astype(np.float64)
        fvu = float(((xd - recon.numpy()) ** 2).sum() / ((xd - xd.mean(0)) ** 2).sum())
        since = state["num_tokens_since_fired"][theirs].numpy()
        splice = SpliceEval.at(lm.backend.splice, lm.tokenizer, lm.hookpoints[h], lm.held_docs, 16_384,
                               c.context, name=c.lm)
        score = scores(splice.losses({"peer": torch_replacement(coder)}), "peer")
        rows.append({"system": system, "hookpoint": name, "k": k, "fvu": fvu,
                     "l0": float((enc.top_acts > 0).sum(-1).float().mean()),
                     "dead_frac": float(1 - fired.mean()),
                     "dead_frac_window": float((since >= c.dead_tokens).mean()),
                     "delta_loss": score["delta_loss"], "kl": score["kl"]})
    return rows


def our_rows(ours: dict) -> list[dict]:
    return [{"system": "ksae_jax", "hookpoint": name, "k": k, "fvu": m["fvu"][i], "l0": m["l0"][i],
             "dead_frac": m["dead_frac"][i], "dead_frac_window": m["dead_frac_window"][i],
             "delta_loss": m["delta_loss"][i], "kl": m["kl"][i]}
            for name, m in ours["hookpoints"].items() for i, k in enumerate(m["ks"])]


def write(c, ours: dict, peers: dict, hookpoints: list[str], peer_tokens: int) -> dict:
    from ksae_jax.lm import live

    lm = live.LiveLM(live.LiveData(model=c.lm, text=c.text, hookpoints=tuple(hookpoints),
                                   context=c.context))
    held = lm.heldout()
    rows = our_rows(ours)
    for name, peer in peers.items():
        k = int(name.rsplit("_k", 1)[1])
        system = "sparsify_defaults" if "_defaults" in name else "sparsify"
        rows += peer_rows(c, system, k, peer, hookpoints, lm, held)
    write_json(c.out / "summary.json", rows)
    speed = speed_table(c, ours, peers, peer_tokens)
    write_json(c.out / "speed.json", speed)
    (c.out / "table.md").write_text(markdown(rows, speed))
    figure(rows, hookpoints, c.out / "frontier.png")
    print(markdown(rows, speed))
    return {"rows": rows, "speed": speed}


def speed_table(c, ours: dict, peers: dict, peer_tokens: int) -> dict:
    """Tokens/s for all models: ksae_jax's training loop, and sparsify's matched runs (one per
    k) one after another; the LM's share of each; ksae_jax's peak RSS against its bound (the
    buffer, the LM and the SAE state of the estimate it prints, plus 1 GB)."""
    matched = [p for n, p in peers.items() if "_defaults" not in n]
    fit = sum(p["fit_seconds"] for p in matched)
    theirs = peer_tokens / fit if matched else None
    return {"ksae_jax_tokens_per_s": ours["tokens_per_s"], "sparsify_tokens_per_s": theirs,
            "ratio": None if theirs is None else ours["tokens_per_s"] / theirs,
            "lm_share_ksae_jax": ours["lm_seconds"] / ours["seconds"],
            "lm_share_sparsify": sum(p["lm_seconds"] for p in matched) / fit if matched else None,
            "peak_rss_mb": ours["peak_rss_mb"], "rss_bound_mb": sum(
                ours["estimate_mb"].get(part, 0) for part in ("buffer", "lm", "sae state")) + 1024,
            "estimate_mb": ours["estimate_mb"],
            "sparsify_peak_rss_mb": max((p["peak_rss_mb"] for p in matched), default=None),
            "commands": {"ksae_jax": ours["command"],
                         **{n: p["command"] for n, p in peers.items()}}}


def markdown(rows: list[dict], speed: dict) -> str:
    lines = ["| hookpoint | k | FVU ksae_jax | FVU sparsify | FVU sparsify defaults | "
             "dead % (window) ksae_jax / sparsify | delta_loss ksae_jax | delta_loss sparsify | "
             "delta_loss sparsify defaults |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["system"], r["hookpoint"], r["k"]): r for r in rows}
    for r in (r for r in rows if r["system"] == "ksae_jax"):
        s = by.get(("sparsify", r["hookpoint"], r["k"]), {})
        d = by.get(("sparsify_defaults", r["hookpoint"], r["k"]), {})
        get = lambda row, f, fmt="{:.4f}": fmt.format(row[f]) if f in row else "-"  # noqa: E731
        lines.append(f"| {r['hookpoint']} | {r['k']} | {get(r, 'fvu')} | {get(s, 'fvu')} | "
                     f"{get(d, 'fvu')} | {100 * r['dead_frac_window']:.1f} / "
                     f"{get(s, 'dead_frac_window', '{:.1%}')} | {get(r, 'delta_loss')} | "
                     f"{get(s, 'delta_loss')} | {get(d, 'delta_loss')} |")
    sp = speed
    lines += ["", f"Tokens/s for all models: ksae_jax {sp['ksae_jax_tokens_per_s']:,.0f}, "
              f"sparsify's runs together {sp['sparsify_tokens_per_s'] or 0:,.0f} "
              f"(ratio {sp['ratio'] or 0:.2f}); the LM's share: ksae_jax "
              f"{sp['lm_share_ksae_jax']:.0%}, sparsify {sp['lm_share_sparsify'] or 0:.0%}; "
              f"ksae_jax's peak RSS {sp['peak_rss_mb']:,.0f} MB (bound {sp['rss_bound_mb']:,.0f})"]
    return "\n".join(lines) + "\n"


def figure(rows: list[dict], hookpoints: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(hookpoints), figsize=(3.2 * len(hookpoints), 3.2),
                             sharey=True, squeeze=False)
    style = {"ksae_jax": ("o-", "C0"), "sparsify": ("s--", "C1"),
             "sparsify_defaults": ("^:", "C2")}
    for ax, name in zip(axes[0], hookpoints):
        for system, (marker, color) in style.items():
            pts = sorted((r["l0"], r["fvu"]) for r in rows
                         if r["system"] == system and r["hookpoint"] == name)
            if pts:
                ax.plot(*zip(*pts), marker, color=color, label=system)
        ax.set_title(name)
        ax.set_xlabel("L0")
        ax.set_xscale("log")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("held-out FVU")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

