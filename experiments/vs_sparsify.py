"""ksae_jax against EleutherAI's sparsify at equal settings, on the same vectors: one ksae_jax
sweep over the ks (experiments.sae) and sparsify's own SparseCoder trained for each k by
shared/peers/sparsify_topk.py (same data, latents, k, batch, steps, lr and AuxK setting).
With --lm both are also judged by the LM loss with their reconstruction spliced in.

    python -m experiments.vs_sparsify --data runs/acts_lm/train --eval-data runs/acts_lm/heldout \\
        --latents 4096 --ks 16 32 64 128 --steps 512 --lm runs/lm --label lm --out runs/vs_lm

Writes DIR/ksae_jax/ (the sae experiment's outputs), DIR/sparsify_k{K}/ (each k's SAE in
sparsify's format and its result JSON) and DIR/summary.json: one row per system and k with
fvu, l0, dead_frac, delta_loss, loss_recovered (null without --lm).
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np

from experiments import sae
from ksae_jax import cli, runner
from ksae_jax.files import write_json
from ksae_jax.lm import splice

PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "sparsify_topk.py"


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.vs_sparsify", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--eval-data", type=Path, required=True)
    p.add_argument("--latents", type=cli.positive_int, required=True)
    p.add_argument("--ks", type=cli.int_value, nargs="+", required=True)
    p.add_argument("--steps", type=cli.positive_int, required=True)
    p.add_argument("--batch-size", type=cli.positive_int, default=4096)
    p.add_argument("--lr", type=cli.positive_float, default=None)
    p.add_argument("--aux-coef", type=cli.nonneg_float, default=1 / 32)
    p.add_argument("--dead-tokens", type=cli.positive_int, default=10_000_000)
    p.add_argument("--label", default="vectors", help="the data's name in summary.json (lm, fashion)")
    p.add_argument("--lm", default=None, help="the LM of the activations: spliced evaluation")
    p.add_argument("--layer", type=cli.int_value, default=None)
    p.add_argument("--peer", type=Path, default=PEER)
    p.add_argument("--skip-sparsify", action="store_true", help="only ksae_jax (e.g. a recipe study)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=cli.positive_int, default=2)
    return p.parse_known_args(argv)


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


def run_peer(args, data: Path, eval_data: Path, k: int, folder: Path) -> tuple[dict, object]:
    """sparsify_topk.py for one k, in this process; returns its result and the trained coder."""
    trained = {}
    folder.mkdir(parents=True, exist_ok=True)
    argv = ["--data", str(data), "--eval-data", str(eval_data), "--latents", str(args.latents),
            "--k", str(k), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
            "--auxk-alpha", str(args.aux_coef), "--dead-tokens", str(args.dead_tokens),
            "--threads", str(args.threads), "--out", str(folder / "result.json")]
    if args.lr:
        argv += ["--lr", str(args.lr)]
    peer = runpy.run_path(str(args.peer), run_name="sparsify_peer")
    measure = peer["fvu_and_fired"]

    def keep(coder, x):  # the peer's final evaluation: also keep the trained coder
        trained["coder"] = coder
        return measure(coder, x)

    peer["main"].__globals__["fvu_and_fired"] = keep
    result = peer["main"](argv)
    trained["coder"].save_to_disk(folder)
    return result, trained["coder"]


def torch_replacement(coder):
    """h -> sparsify's reconstruction of every row (its encode, then decode with b_dec)."""
    import torch

    def replace(h):
        rows = h.reshape(-1, h.shape[-1])
        with torch.no_grad():
            enc = coder.encode(rows)
            return coder.decode(enc.top_acts, enc.top_indices).reshape(h.shape).to(h.dtype)

    return replace


def main(argv=None):
    args, extra = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    sae_argv = ["--data", str(args.data), "--eval-data", str(args.eval_data), "--latents",
                str(args.latents), "--ks", *map(str, args.ks), "--steps", str(args.steps),
                "--batch-size", str(args.batch_size), "--aux-coef", str(args.aux_coef),
                "--dead-tokens", str(args.dead_tokens), "--out", str(args.out / "ksae_jax"),
                "--overwrite", "--no-progress", *extra]
    if args.lr:
        sae_argv += ["--lr", str(args.lr)]
    if args.lm:
        sae_argv += ["--lm", args.lm] + (["--layer", str(args.layer)] if args.layer is not None else [])
    experiment = sae.Sae()
    run = runner.execute(experiment, sae_argv)
    m = json.loads((run.out / "metrics.json").read_text())
    rows = [_row("ksae_jax", args.label, k, m, i) for i, k in enumerate(m["ks"])]
    if not args.skip_sparsify:
        data = as_one_npy(args.data, args.out / "train_all.npy")
        held = as_one_npy(args.eval_data, args.out / "heldout_all.npy")
        for k in args.ks:
            result, coder = run_peer(args, data, held, k, args.out / f"sparsify_k{k}")
            row = {"system": "sparsify", "data": args.label, "k": k, "fvu": result["eval_fvu"],
                   "l0": float(k), "dead_frac": result["dead_fraction_eval"],
                   "delta_loss": None, "loss_recovered": None}
            if args.lm:
                losses = experiment.lm_eval.losses({"sparsify": torch_replacement(coder)})
                score = splice.scores(losses, "sparsify")
                row.update(delta_loss=score["delta_loss"], loss_recovered=score["loss_recovered"])
            rows.append(row)
    write_json(args.out / "summary.json", rows)
    _print(rows)


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
    cli.run(main, sys.argv[1:], prog="vs_sparsify")
