"""Speed, measured in child processes (each with its own peak memory) on the same data and
thread count, with compile time apart, peak memory and GFLOP/s against a matmul peak it
measures.

    python -m benchmarks.speed                     # the image suite (conv, MLP; vs PyTorch)
    python -m benchmarks.speed --suite sae         # TopK SAEs vs EleutherAI's sparsify
    python -m benchmarks.speed --suite all --quick # smoke test of both, a few steps
    python -m benchmarks.speed --suite largest     # one step of the 1M-latent SAE

benchmarks/gpu.sh runs them on a GPU. The PyTorch peers (peers/) run when torch (and, for
the SAE suite, eai-sparsify) are installed: `pip install torch==2.13.0 eai-sparsify`. Writes
images.json/.md, sae.json/.md or largest.json/.md into --out (default
benchmarks/results/DATE_MACHINE); every measurement is kept in OUT/done/ as it finishes, so
that the same command rerun with --resume after an interruption goes on where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Literal

from benchmarks import images, measure, sae
from ksae_jax import cli, flags
from ksae_jax.files import write_bytes, write_json

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"images": (images.run_suite, images.markdown, "images"),
          "sae": (sae.run_suite, sae.markdown, "sae"),
          "largest": (sae.run_largest, sae.markdown_largest, "largest")}
CHILDREN = {**images.CHILDREN, **sae.CHILDREN}


@dataclasses.dataclass(frozen=True)
class Speed:
    """What to time, and how."""

    suite: Literal["images", "sae", "largest", "all"] = "images"
    """all: images and sae."""
    quick: bool = False
    """Smoke test: a few steps, synthetic data, every run in this process (no start-ups, but
    peak memory shared)."""
    idx_dir: Path | None = None
    """images: MNIST-format data (None: Debian's Fashion-MNIST if installed, else synthetic)."""
    torch: bool = True
    """Run the PyTorch peers (when torch is installed)."""
    torch_device: str = "cpu"
    """images: the device of the PyTorch loops (cuda on a GPU)."""
    sae_shapes: Literal["cpu", "gpu"] = "cpu"
    """sae: the shapes (cpu: d 768 and 512; gpu: d 768 and 4096)."""
    dtypes: tuple[str, ...] = ("float32",)
    """sae: ksae_jax's runs in each of these dtypes (float32, bfloat16)."""
    sae_steps: int = 15
    """sae: steps per run, the first 3 untimed."""
    out: Path | None = None
    """Output folder (None: benchmarks/results/DATE_MACHINE, runs/benchmark-quick with quick)."""
    resume: bool = False
    """Go on with an interrupted run into the same out: keep the measurements it finished."""


def resumable_child(done: Path, in_process: bool = False):
    """child(kind, spec, timeout): one measurement in a fresh process (in this one with
    in_process), its result kept in done/ so that a rerun into the same folder (after an
    interruption) goes on where it was."""
    done.mkdir(parents=True, exist_ok=True)

    def child(kind: str, spec: dict, timeout: float) -> dict:
        key = hashlib.sha256(json.dumps([kind, spec], sort_keys=True).encode()).hexdigest()[:16]
        path = done / f"{kind}-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        result = (CHILDREN[kind](spec) if in_process
                  else measure.run_child("benchmarks.speed", kind, spec, timeout, ROOT))
        write_json(path, result)
        return result
    return child


def default_out(cfg: Speed) -> Path:
    return ROOT / "runs" / "benchmark-quick" if cfg.quick else measure.results_folder()


def main(argv=None):
    parser = flags.make_parser("python -m benchmarks.speed", __doc__.split("\n\n")[0],
                               [flags.Group("benchmark", (Speed,))])
    cfg = flags.build(Speed, flags.parse(parser, argv))
    if cfg.idx_dir is not None and not cfg.idx_dir.is_dir():
        raise flags.UsageError(f"--idx-dir {cfg.idx_dir}: no such directory")
    out = cfg.out or default_out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        shutil.rmtree(out / "done", ignore_errors=True)
    child = resumable_child(out / "done", in_process=cfg.quick)
    args = types.SimpleNamespace(**dataclasses.asdict(cfg), threads=os.cpu_count(),
                                 data_dir=out / "data")
    args.torch = importlib.util.find_spec("torch") is not None and cfg.torch
    for name in (("images", "sae") if cfg.suite == "all" else (cfg.suite,)):
        run_suite, markdown, stem = SUITES[name]
        results = {"machine": measure.describe_machine(), "versions": measure.versions(),
                   "quick": cfg.quick, **run_suite(args, child)}
        m = results["machine"]
        text = (f"# ksae_jax benchmark\n\nMachine: {m['cpu']} ({m['isa']}), {m['cores']} cores; "
                f"{', '.join(f'{k} {v}' for k, v in results['versions'].items())}. Rerun: "
                f"`python -m benchmarks.speed {' '.join(sys.argv[1:] if argv is None else argv)}`"
                f".\n\n" + markdown(results))
        write_json(out / f"{stem}.json", results)
        write_bytes(out / f"{stem}.md", text.encode())
        print(text)
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        print(json.dumps(CHILDREN[sys.argv[2]](spec)))
    else:
        cli.run(main, "benchmarks.speed")
