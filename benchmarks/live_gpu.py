"""The live stage of benchmarks/gpu.sh: a GPT-2 built from a config (random weights: nothing
to download), SAEs for its blocks and two ks trained live by `ksae train --model`, once with
the LM in JAX (its forward compiled beside the SAE step) and once in torch on the GPU, and the
DLPack hand-off of one forward pass's activations from torch to JAX timed. gpu.sh sets
XLA_PYTHON_CLIENT_MEM_FRACTION so that JAX leaves the torch LM its memory.

    python -m benchmarks.live_gpu --out OUT [--dry-run]

Writes OUT/live.json: per backend ("jax", "torch") tokens_per_s and lm_share; the hand-off's
seconds and GB/s, the devices.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "README.md"
SHAPES = {"dry": {"layers": 2, "d_model": 32, "heads": 2, "context": 16, "vocab": 400,
                  "latents": 128, "tokens": 4096, "batch": 512},
          "gpu": {"layers": 12, "d_model": 768, "heads": 12, "context": 128, "vocab": 4096,
                  "latents": 12288, "tokens": 2_097_152, "batch": 4096}}


def build_lm(out: Path, s: dict) -> Path:
    """A GPT-2 of the shape, with a BPE trained on README.md (two steps of training)."""
    from ksae_jax.lm import offline_lm

    cfg = offline_lm.LMConfig(layers=s["layers"], d_model=s["d_model"], heads=s["heads"],
                              context=s["context"], vocab=s["vocab"], batch_size=2, steps=2,
                              text=str(TEXT), eval_windows=2)
    offline_lm.train(cfg, out / "lm", progress=False)
    return out / "lm"


def handoff(lm_dir: Path, s: dict, reps: int = 20) -> dict:
    """Seconds of jax.dlpack.from_dlpack on one forward pass's block output (32 contexts)."""
    import jax
    import torch

    from ksae_jax.lm import model as lm_model

    model, _ = lm_model.load(str(lm_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h = torch.randn(32, s["context"], s["d_model"], device=device)
    jax.dlpack.from_dlpack(h).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        jax.dlpack.from_dlpack(h).block_until_ready()
    seconds = (time.perf_counter() - t) / reps
    del model
    return {"handoff_seconds": seconds, "handoff_gb_per_s": h.numel() * 4 / seconds / 1e9,
            "torch_device": device, "jax_device": str(jax.devices()[0])}


def live_run(run: Path, lm_dir: Path, s: dict, backend: str, in_process: bool) -> dict:
    """`ksae train --model LM` for the blocks and two ks; in this process with in_process (the
    dry run: torch and the LM load once), else in one of its own."""
    argv = ["train", "--model", str(lm_dir), "--text", str(TEXT), "--latents", str(s["latents"]),
            "--ks", "32", "64", "--tokens", str(s["tokens"]), "--batch-size", str(s["batch"]),
            "--context", str(s["context"]), "--heldout-tokens", "512", "--lm-tokens", "128",
            "--buffer-tokens", str(8 * s["batch"]), "--lm-backend", backend, "--out", str(run),
            "--overwrite", "--no-progress"]
    if in_process:
        from ksae_jax import cli
        cli.COMMANDS["train"].main(argv[1:], "ksae train")
    else:
        r = subprocess.run([sys.executable, "-m", "ksae_jax", *argv], capture_output=True,
                           text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"the live run ({backend}) failed:\n{r.stderr[-3000:]}")
    m = json.loads((run / "metrics.json").read_text())
    return {"tokens": m["tokens"], "tokens_per_s": m["tokens_per_s"],
            "lm_share": m["lm_seconds"] / m["seconds"], "hookpoints": len(m["hookpoints"])}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.live_gpu", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    s = SHAPES["dry" if args.dry_run else "gpu"]
    args.out.mkdir(parents=True, exist_ok=True)
    lm_dir = build_lm(args.out, s)
    runs = {backend: live_run(args.out / f"live_{backend}", lm_dir, s, backend, args.dry_run)
            for backend in ("jax", "torch")}
    hookpoints = {backend: r.pop("hookpoints") for backend, r in runs.items()}
    result = {"dry_run": args.dry_run, **runs, "hookpoints": hookpoints["torch"],
              "tokens": runs["torch"]["tokens"], **handoff(lm_dir, s)}
    (args.out / "live.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
