"""Speed, measured in child processes (each with its own peak memory) on the same data and
thread count.

    python -m experiments.benchmark                # the image suite (conv, MLP; vs PyTorch)
    python -m experiments.benchmark --suite sae    # TopK SAEs vs EleutherAI's sparsify
    python -m experiments.benchmark --suite all --quick   # smoke test of both, a few steps
    python -m experiments.benchmark --suite largest       # one step of the 1M-latent SAE

benchmarks/gpu.sh runs them on a GPU (--sae-shapes gpu --dtypes float32 bfloat16).

PyTorch peers run when torch (and, for the SAE suite, eai-sparsify) are installed:
`pip install torch==2.13.0 eai-sparsify`. Writes results.json/results.md (images) and
sae.json/sae.md (SAEs) to --out (default benchmarks/).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from experiments import bench_images, bench_sae
from ksae_jax import bench, cli
from ksae_jax.files import write_bytes, write_json

ROOT = Path(__file__).resolve().parents[1]
SUITES = {"images": (bench_images.run_suite, bench_images.markdown, "results"),
          "sae": (bench_sae.run_suite, bench_sae.markdown, "sae"),
          "largest": (bench_sae.run_largest, bench_sae.markdown_largest, "largest")}
CHILDREN = {**bench_images.CHILDREN, **bench_sae.CHILDREN}


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=("images", "sae", "largest", "all"), default="images",
                   help="all: images and sae")
    p.add_argument("--quick", action="store_true", help="smoke test: a few steps, synthetic data")
    p.add_argument("--idx-dir", type=Path, default=None,
                   help=f"images: MNIST-format data (default {bench_images.FASHION} if present, "
                        "else synthetic)")
    p.add_argument("--torch-script", type=Path, default=bench_images.SEED_TORCH,
                   help="images: the original-style PyTorch loop (default shared/peers/seed_torch.py)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch peers")
    p.add_argument("--torch-device", default="cpu",
                   help="images: the device of the PyTorch loops (cuda on a GPU; default cpu)")
    p.add_argument("--sae-shapes", choices=tuple(bench_sae.SHAPES), default="cpu",
                   help="SAE suite: the shapes (cpu: d 768 and 512; gpu: d 768 and 4096)")
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"), default=["float32"],
                   help="SAE suite: ksae_jax's runs in each (default float32)")
    p.add_argument("--sae-peer", type=Path, default=bench_sae.PEER,
                   help="SAE suite: sparsify's script (default shared/peers/sparsify_topk.py; "
                        "benchmarks/sparsify_cuda.py on a GPU)")
    p.add_argument("--sae-steps", type=cli.positive_int, default=15,
                   help="SAE suite: steps per run, the first 3 untimed (default 15)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/, runs/benchmark-quick with --quick)")
    return p.parse_args(argv)


def child(kind: str, spec: dict, timeout: float) -> dict:
    return bench.run_child("experiments.benchmark", kind, spec, timeout, ROOT)


def main(argv=None):
    args = parse_args(argv)
    if args.idx_dir is not None and not args.idx_dir.is_dir():
        raise cli.UsageError(f"--idx-dir {args.idx_dir}: no such directory")
    out = args.out or (ROOT / ("runs/benchmark-quick" if args.quick else "benchmarks"))
    out.mkdir(parents=True, exist_ok=True)
    args.threads = os.cpu_count()
    args.torch = importlib.util.find_spec("torch") is not None and not args.no_torch
    for name in (("images", "sae") if args.suite == "all" else (args.suite,)):
        run_suite, markdown, stem = SUITES[name]
        results = {"machine": bench.describe_machine(), "versions": bench.versions(),
                   "quick": args.quick, **run_suite(args, child)}
        m = results["machine"]
        text = (f"# ksae_jax benchmark\n\nMachine: {m['cpu']}, {m['cores']} cores; "
                f"{', '.join(f'{k} {v}' for k, v in results['versions'].items())}.\n\n"
                + markdown(results))
        write_json(out / f"{stem}.json", results)
        write_bytes(out / f"{stem}.md", text.encode())
        print(text)
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
        print(json.dumps(CHILDREN[sys.argv[2]](spec)))
    else:
        cli.run(main)
