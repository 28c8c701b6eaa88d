"""The LM in JAX against the LM in PyTorch, in the same ksae_jax live run, and end-to-end
(KL) against reconstruction (FVU) training at equal L0.

    python -m benchmarks.jax_lm --lm runs/lm --out results/jax_lm

Stages, each kept as OUT/<stage>.json when it finishes (a rerun goes on from there):
- heldout: the offline LM's held-out loss by the torch model and by the JAX forward, on the
  windows `ksae lm` evaluates;
- speed_jax, speed_torch: `ksae train` live on every block, k = 32 and 64, batch 4096, with
  --lm-backend jax and torch one after the other (tokens/s, the LM's share, peak RSS);
- e2e_fvu, e2e_kl, e2e_fvu+kl: one hookpoint, the same ks, tokens and contexts, --loss fvu,
  kl and fvu+kl (--kl-coef 1) (held-out FVU, and delta_loss / KL with the SAE spliced in);
- lm_alone_jax, lm_alone_torch: the speed runs' forward passes alone, with nothing beside
  them (the LM's share of each run: these seconds over the run's).
Writes OUT/summary.json and OUT/table.md.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.live import measured, stage
from ksae_jax import cli, flags
from ksae_jax.files import write_json


@dataclasses.dataclass(frozen=True)
class JaxLMComparison:
    """The runs the comparison makes."""

    lm: str
    """The offline LM's folder (ksae lm writes it)."""
    out: Path
    """Output folder (a rerun goes on from the stages already done)."""
    text: str = "gcide"
    """The text every run reads."""
    ks: tuple[int, ...] = (32, 64)
    """The speed runs' ks."""
    tokens: int = 1_048_576
    """Training tokens of each speed run."""
    e2e_hookpoint: str = "resid_post.1"
    """The end-to-end runs' hookpoint."""
    e2e_ks: tuple[int, ...] = (16, 32)
    """The end-to-end runs' ks (TopK: L0 = k, so equal L0 by construction)."""
    e2e_tokens: int = 1_048_576
    """Training tokens of each end-to-end run."""
    e2e_context: int = 65
    """Tokens per context of the end-to-end runs (64 predictions: 64 contexts a batch)."""


def speed(c: JaxLMComparison, backend: str) -> dict:
    out = c.out / f"speed_{backend}"
    cmd = [sys.executable, "-m", "ksae_jax", "train", "--model", c.lm, "--text", c.text,
           "--latents", "4096", "--ks", *map(str, c.ks), "--tokens", str(c.tokens),
           "--dead-tokens", "1000000", "--lm-backend", backend, "--out", str(out),
           "--overwrite", "--no-progress"]
    got = measured(cmd, c.out / f"speed_{backend}.log")
    m = json.loads((out / "metrics.json").read_text())
    return {**got, "command": " ".join(cmd[1:]), "tokens_per_s": m["tokens_per_s"],
            "lm_share": m["lm_seconds"] / m["seconds"], "seconds": m["seconds"],
            "hookpoints": m["hookpoints"]}


def lm_alone(c: JaxLMComparison, backend: str) -> dict:
    """Seconds of the speed run's forward passes (its chunks of rows) with nothing beside
    them: the LM's share of a run is these over the run's seconds (inside a run the passes
    share the cores with the SAE step, or queue behind it)."""
    import time

    from ksae_jax.lm import live
    lm = live.LiveLM(live.LiveData(model=c.lm, text=c.text, lm_backend=backend,
                                   heldout_tokens=4096), log=lambda _: None)
    half = live.LiveStream(lm, 4096, 0).half
    chunks = live.row_chunks(lm, 0, 0, half)
    next(chunks)  # compiled
    n = -(-c.tokens // half) + 1  # the run's chunks: its rows and the buffer's first half
    t = time.perf_counter()
    for _ in range(n):
        next(chunks).block_until_ready()
    return {"seconds": time.perf_counter() - t, "chunks": n, "rows_per_chunk": half}


def e2e(c: JaxLMComparison, loss: str) -> dict:
    out = c.out / f"e2e_{loss}"
    cmd = [sys.executable, "-m", "ksae_jax", "train", "--model", c.lm, "--text", c.text,
           "--hookpoints", c.e2e_hookpoint, "--latents", "4096", "--ks", *map(str, c.e2e_ks),
           "--tokens", str(c.e2e_tokens), "--context", str(c.e2e_context),
           "--dead-tokens", "1000000", "--lm-backend", "jax", "--loss", loss,
           "--out", str(out), "--overwrite", "--no-progress"]
    got = measured(cmd, c.out / f"e2e_{loss}.log")
    m = json.loads((out / "metrics.json").read_text())["hookpoints"][c.e2e_hookpoint]
    return {**got, "command": " ".join(cmd[1:]),
            "rows": [{"loss": loss, "k": k, "fvu": m["fvu"][i], "l0": m["l0"][i],
                      "delta_loss": m["delta_loss"][i], "kl": m["kl"][i]}
                     for i, k in enumerate(m["ks"])]}


def heldout(c: JaxLMComparison) -> dict:
    """The held-out loss `ksae lm` reports, by torch and by the JAX forward, on its windows."""
    from ksae_jax.lm import jax_lm, offline_lm, text
    from ksae_jax.lm import model as lm_model

    model, tok = lm_model.load(c.lm)
    summary = json.loads((Path(c.lm) / "train_lm.json").read_text())
    cfg = summary["config"]
    held = offline_lm.token_stream(tok, text.split(text.documents(cfg["text"]))[1])
    n = min(cfg["eval_windows"], (len(held) - 1) // (cfg["context"] - 1))
    windows = offline_lm.windows(held, np.arange(n) * (cfg["context"] - 1), cfg["context"],
                                 tok.bos_token_id)
    torch_loss = offline_lm.heldout_loss(model, windows, offline_lm.token_bytes(tok))["loss"]
    return {"heldout_loss_torch": torch_loss, "heldout_loss_reported": summary["heldout"]["loss"],
            "heldout_loss_jax": jax_lm.next_token_loss(jax_lm.load(c.lm), windows),
            "windows": int(n)}


def main(argv=None) -> dict:
    parser = flags.make_parser("python -m benchmarks.jax_lm", __doc__.split("\n\n")[0],
                               [flags.Group("comparison", (JaxLMComparison,))])
    c = flags.build(JaxLMComparison, flags.parse(parser, argv))
    c.out.mkdir(parents=True, exist_ok=True)
    loss = stage(c, "heldout", lambda: heldout(c))
    runs = {b: stage(c, f"speed_{b}", lambda b=b: speed(c, b)) for b in ("jax", "torch")}
    ends = {name: stage(c, f"e2e_{name}", lambda n=name: e2e(c, n))
            for name in ("fvu", "kl", "fvu+kl")}
    for b in ("jax", "torch"):
        runs[b]["lm_share_in_run"] = runs[b].pop("lm_share")  # the run's own clock
        runs[b]["lm_alone_seconds"] = stage(c, f"lm_alone_{b}",
                                            lambda b=b: lm_alone(c, b))["seconds"]
        runs[b]["lm_share"] = runs[b]["lm_alone_seconds"] / runs[b]["seconds"]
    summary = {"tokens_per_s_jax": runs["jax"]["tokens_per_s"],
               "tokens_per_s_torch": runs["torch"]["tokens_per_s"],
               "peak_rss_mb_jax": runs["jax"]["peak_rss_mb"],
               "peak_rss_mb_torch": runs["torch"]["peak_rss_mb"],
               "lm_share_jax": runs["jax"]["lm_share"], "lm_share_torch": runs["torch"]["lm_share"],
               "lm_share_in_run_jax": runs["jax"]["lm_share_in_run"],
               "lm_share_in_run_torch": runs["torch"]["lm_share_in_run"],
               "heldout_loss_jax": loss["heldout_loss_jax"],
               "heldout_loss_torch": loss["heldout_loss_torch"],
               "e2e": [row for end in ends.values() for row in end["rows"]],
               "commands": {name: r["command"] for name, r in
                            {**{f"speed_{b}": r for b, r in runs.items()},
                             **{f"e2e_{n}": r for n, r in ends.items()}}.items()}}
    write_json(c.out / "summary.json", summary)
    (c.out / "table.md").write_text(table(summary, runs))
    print(table(summary, runs))
    return summary


def table(s: dict, runs: dict) -> str:
    lines = ["| LM backend | tokens/s | LM alone / run | LM clock in the run | peak RSS (MB) | "
             "held-out loss |", "|---|---:|---:|---:|---:|---:|"]
    for b in ("jax", "torch"):
        lines.append(f"| {b} | {s[f'tokens_per_s_{b}']:,.0f} | {s[f'lm_share_{b}']:.0%} | "
                     f"{s[f'lm_share_in_run_{b}']:.0%} | {s[f'peak_rss_mb_{b}']:,.0f} | "
                     f"{s[f'heldout_loss_{b}']:.6f} |")
    lines += ["", "| loss | k | L0 | held-out FVU | delta_loss | KL |", "|---|---:|---:|---:|---:|---:|"]
    for r in s["e2e"]:
        lines.append(f"| {r['loss']} | {r['k']} | {r['l0']:.1f} | {r['fvu']:.4f} | "
                     f"{r['delta_loss']:.4f} | {r['kl']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli.run(main, "benchmarks.jax_lm")
