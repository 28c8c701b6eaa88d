"""Quality against EleutherAI's sparsify at equal settings, on the same vectors: one ksae_jax
sweep over the ks (`ksae train`) and sparsify's own SparseCoder trained for each k as its
Trainer trains one (peers/sparsify_topk.py: same data, latents, k, batch, steps, lr and AuxK
setting). With --lm both are also judged by the LM loss with their reconstruction spliced in.

    python -m benchmarks.vs_sparsify --data runs/acts_lm/train --eval-data runs/acts_lm/heldout \
        --latents 4096 --ks 16 32 64 128 --steps 512 --lm runs/lm --label lm --out runs/vs_lm

Writes DIR/ksae_jax/ (ksae train's outputs), DIR/sparsify_k{K}/ (each k's SAE in sparsify's
format and its result JSON) and DIR/summary.json: one row per system and k with fvu, l0,
dead_frac, delta_loss, loss_recovered (null without --lm). Flags beside these go to ksae train.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from benchmarks.peers import sparsify_topk
from ksae_jax import cli, flags, sae_run
from ksae_jax.files import write_json


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The settings both libraries share, and what the comparison writes."""

    data: Path
    """Training vectors: one .npy or a folder of shards."""
    eval_data: Path
    """Held-out vectors."""
    latents: int
    """Latents n."""
    ks: tuple[int, ...]
    """One SAE per k (ksae_jax: one sweep; sparsify: one run each)."""
    steps: int
    """Steps of batch_size vectors."""
    out: Path
    """Output folder."""
    batch_size: int = 4096
    """Vectors per step."""
    lr: float | None = None
    """Adam's lr (None: 2e-4 / sqrt(latents / 2^14), both libraries' default)."""
    aux_coef: float = 1 / 32
    """AuxK's weight."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many training vectors without firing."""
    label: str = "vectors"
    """The data's name in summary.json (lm, fashion)."""
    lm: str | None = None
    """The LM of the activations: spliced evaluation."""
    layer: int | None = None
    """Its block (None: the cache's meta.json)."""
    skip_sparsify: bool = False
    """Only ksae_jax (e.g. a recipe study)."""
    threads: int = 2
    """sparsify's torch threads."""


def as_one_npy(path: Path, out: Path) -> Path:
    """The peer reads one .npy: a folder of shards is concatenated into out (once)."""
    if path.is_file():
        return path
    if not out.exists():
        shards = sorted(path.glob("*.npy"))
        n = sum(np.load(f, mmap_mode="r").shape[0] for f in shards)
        d = np.load(shards[0], mmap_mode="r").shape[1]
        whole = np.lib.format.open_memmap(out, "w+", np.float32, (n, d))
        pos = 0
        for f in shards:
            a = np.load(f, mmap_mode="r")
            whole[pos:pos + len(a)] = a
            pos += len(a)
        whole.flush()
    return out


def torch_replacement(coder):
    """h -> sparsify's reconstruction of every row (its encode, then decode with b_dec)."""
    import torch

    def replace(h):
        rows = h.reshape(-1, h.shape[-1])
        with torch.no_grad():
            enc = coder.encode(rows)
            return coder.decode(enc.top_acts, enc.top_indices).reshape(h.shape).to(h.dtype)

    return replace


def ksae_argv(c: Comparison, extra: list[str]) -> list[str]:
    argv = ["--data", str(c.data), "--eval-data", str(c.eval_data), "--latents", str(c.latents),
            "--ks", *map(str, c.ks), "--steps", str(c.steps), "--batch-size", str(c.batch_size),
            "--aux-coef", str(c.aux_coef), "--dead-tokens", str(c.dead_tokens),
            "--out", str(c.out / "ksae_jax"), "--overwrite", "--no-progress", *extra]
    argv += ["--lr", str(c.lr)] if c.lr else []
    if c.lm:
        argv += ["--lm", c.lm] + (["--layer", str(c.layer)] if c.layer is not None else [])
    return argv


def main(argv=None):
    parser = flags.make_parser("python -m benchmarks.vs_sparsify", __doc__.split("\n\n")[0],
                               [flags.Group("comparison", (Comparison,))])
    values, extra = parser.parse_known_args(argv)
    c = flags.build(Comparison, vars(values))
    c.out.mkdir(parents=True, exist_ok=True)
    run = sae_run.main(ksae_argv(c, extra))
    m = json.loads((run.out / "metrics.json").read_text())
    rows = [_row("ksae_jax", c.label, k, m, i) for i, k in enumerate(m["ks"])]
    if not c.skip_sparsify:
        rows += peer_rows(c)
    write_json(c.out / "summary.json", rows)
    _print(rows)
    return rows


def peer_rows(c: Comparison) -> list[dict]:
    data = as_one_npy(c.data, c.out / "train_all.npy")
    held = as_one_npy(c.eval_data, c.out / "heldout_all.npy")
    splice = None if c.lm is None else sae_run.splice_evaluation({"lm": c.lm, "layer": c.layer},
                                                                   c.data)
    rows = []
    for k in c.ks:
        folder = c.out / f"sparsify_k{k}"
        folder.mkdir(parents=True, exist_ok=True)
        result, coder = sparsify_topk.run(sparsify_topk.PeerRun(
            data=data, eval_data=held, latents=c.latents, k=k, batch_size=c.batch_size,
            steps=c.steps, lr=c.lr, auxk_alpha=c.aux_coef, dead_tokens=c.dead_tokens,
            threads=c.threads, out=folder / "result.json", save=folder))
        row = {"system": "sparsify", "data": c.label, "k": k, "fvu": result["eval_fvu"],
               "l0": float(k), "dead_frac": result["dead_fraction_eval"], "delta_loss": None,
               "loss_recovered": None}
        if splice is not None:
            from ksae_jax.lm.splice import scores
            score = scores(splice.losses({"sparsify": torch_replacement(coder)}), "sparsify")
            row.update(delta_loss=score["delta_loss"], loss_recovered=score["loss_recovered"])
        rows.append(row)
    return rows


def _row(system: str, label: str, k: int, m: dict, i: int) -> dict:
    get = (lambda f: m[f][i] if f in m else None)
    return {"system": system, "data": label, "k": k, "fvu": m["fvu"][i], "l0": m["l0"][i],
            "dead_frac": m["dead_frac"][i], "delta_loss": get("delta_loss"),
            "loss_recovered": get("loss_recovered")}


def _print(rows: list[dict]) -> None:
    print(f"\n{'system':>9} {'k':>4} {'FVU':>8} {'L0':>7} {'dead %':>7} {'delta loss':>11}")
    for r in rows:
        dl = "" if r["delta_loss"] is None else f"{r['delta_loss']:.4f}"
        print(f"{r['system']:>9} {r['k']:>4} {r['fvu']:>8.4f} {r['l0']:>7.2f} "
              f"{100 * r['dead_frac']:>6.2f}% {dl:>11}")


if __name__ == "__main__":
    cli.run(main, "vs_sparsify")
