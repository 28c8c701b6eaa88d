"""The image suite of the speed benchmark: ksae_jax's conv and MLP sweeps against the same
models run one after another and against PyTorch (the original's loop, peers/original.py).
One epoch of 60,000 images per run (Fashion-MNIST when installed, else synthetic); compile
time is measured apart (ahead-of-time lower + compile) and excluded from the epoch times.
"""
from __future__ import annotations

import gzip
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import matmul_peak, peak_rss_mb, timed

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
CONV_KS = (5, 10, 25, 50, 100)
MLP_K = 25


# ---------------------------------------------------------------- child processes

def child_jax(spec: dict) -> dict:
    """One ksae_jax configuration: compile time, train epoch time, test evaluation time."""
    import jax

    from ksae_jax import Execution, ImageModel, SweepConfig, prepare
    from ksae_jax.data import images
    from ksae_jax.data.feed import ArrayRows
    from ksae_jax.evaluate import EvalSet, evaluate

    ds = images.load_idx_dir(spec["idx_dir"]).limit_train(spec.get("train_limit"))
    rows, test = ArrayRows(ds.x_train, 1 / 255), EvalSet(ArrayRows(ds.x_test, 1 / 255), 1000)
    groups = [spec["ks"]] if spec["mode"] == "sweep" else [[k] for k in spec["ks"]]
    out = {"compile_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "steps": 0}
    for ks in groups:
        cfg = SweepConfig(model=ImageModel(spec["arch"], l1=spec["l1"]), ks=tuple(ks),
                          batch_size=spec["batch"],
                          execution=Execution(batching=spec.get("batching", "auto")))
        run = prepare(cfg, rows, feeder="device")
        state, sums, ks_arr = run.state, run.zero_sums(), run.ks_at(0)
        t = time.perf_counter()
        step = run.compile(next(run.batches))
        out["compile_s"] += time.perf_counter() - t
        state, sums = step(state, sums, next(run.batches), ks_arr, np.int32(0))  # warm-up, untimed
        jax.block_until_ready(sums)
        n_steps = spec.get("steps") or run.budget.steps_per_epoch
        t = time.perf_counter()
        for i in range(n_steps):
            state, sums = step(state, sums, next(run.batches), ks_arr, np.int32(i))
        jax.block_until_ready(sums)
        out["train_s"] += time.perf_counter() - t
        out["steps"] += n_steps
        evaluate(run.run_cfg, state.params, test)  # compile
        out["eval_s"] += timed(lambda: evaluate(run.run_cfg, state.params, test))
    out.update(n_models=len(spec["ks"]), images=out["steps"] // len(groups) * spec["batch"],
               peak_rss_mb=peak_rss_mb())
    return out


def child_torch_mlp(spec: dict) -> dict:
    """A PyTorch MLP k-sparse autoencoder loop written like the original's (per-step item())."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(1)
    from ksae_jax.data.images import read_idx

    x = torch.from_numpy(read_idx(Path(spec["idx_dir"]) / "train-images-idx3-ubyte.gz")
                         .reshape(-1, 784).astype(np.float32) / 255)
    if spec.get("train_limit"):
        x = x[:spec["train_limit"]]
    device = spec.get("torch_device", "cpu")
    x = x.to(device)
    enc, dec = torch.nn.Linear(784, 1000).to(device), torch.nn.Linear(1000, 784).to(device)
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=1e-3)
    k, batch = spec["ks"][0], spec["batch"]

    def step(img):
        opt.zero_grad()
        h = enc(img)
        vals, idx = torch.topk(h, k)
        code = torch.zeros_like(h).scatter(1, idx, vals)
        loss = torch.mean((dec(code) - img) ** 2) + spec["l1"] * code.abs().mean()
        loss.backward()
        opt.step()
        return loss.item()

    step(x[:batch])  # warm-up
    n_steps = spec.get("steps") or -(-len(x) // batch)
    perm = torch.randperm(len(x), device=device)
    t = time.perf_counter()
    for i in range(n_steps):
        step(x[perm[i * batch:(i + 1) * batch]])
    train_s = time.perf_counter() - t
    return {"train_s": train_s, "eval_s": 0.0, "compile_s": 0.0, "steps": n_steps, "n_models": 1,
            "images": n_steps * batch, "peak_rss_mb": peak_rss_mb()}


def child_torch_conv(spec: dict) -> dict:
    """The original's loop (peers/original.py), five ks one after another."""
    import contextlib
    import io

    from benchmarks.peers import original

    argv = ["--idx-dir", spec["idx_dir"], "--epochs", "1", "--ks", *map(str, spec["ks"]),
            "--threads", str(spec["threads"]), "--device", spec.get("torch_device", "cpu")]
    if spec.get("train_limit"):
        argv += ["--limit", str(spec["train_limit"])]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = original.main(argv)
    per_k = [float(m) for m in re.findall(r"time=([\d.]+)s", buf.getvalue())]
    n = result["n_train"]
    return {"train_s": result["total_s"], "eval_s": 0.0, "compile_s": 0.0, "per_k_s": per_k,
            "steps": len(spec["ks"]) * -(-n // spec["batch"]), "n_models": len(spec["ks"]),
            "images": n, "peak_rss_mb": peak_rss_mb(), "includes_eval": True,
            "test_mse": result["test_mse"]}


def child_matmul_peak(spec) -> dict:
    return matmul_peak(spec.get("n", 2048))


CHILDREN = {"peak": child_matmul_peak, "jax": child_jax, "torch-mlp": child_torch_mlp,
            "torch-conv": child_torch_conv}


# ---------------------------------------------------------------- data

def synthetic_idx_dir(n_train: int, n_test: int) -> Path:
    """Random MNIST-format files (speed does not depend on the pixels)."""
    d = Path(tempfile.mkdtemp(prefix="ksae_bench_"))
    rng = np.random.default_rng(0)
    for stem, shape in (("train-images-idx3-ubyte", (n_train, 28, 28)),
                        ("train-labels-idx1-ubyte", (n_train,)),
                        ("t10k-images-idx3-ubyte", (n_test, 28, 28)),
                        ("t10k-labels-idx1-ubyte", (n_test,))):
        a = rng.integers(0, 256 if len(shape) == 3 else 10, shape, dtype=np.uint8)
        header = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
        (d / (stem + ".gz")).write_bytes(gzip.compress(header + a.tobytes(), compresslevel=1))
    return d


# ---------------------------------------------------------------- report

def _row(name: str, arch: str, r: dict, peak: float) -> dict:
    """Adds throughput (images x models / s) and the FLOP rate: training is counted as 3x
    the forward FLOPs of the layer shapes (forward + two gradient products)."""
    from ksae_jax.config import ImageModel
    from ksae_jax.models.images import forward_flops

    model_images_per_s = r["images"] * r["n_models"] / r["train_s"]
    train_flops = 3 * forward_flops(ImageModel(arch))
    gflops = train_flops * model_images_per_s / 1e9
    return {"name": name, **r, "train_flops_per_image": train_flops,
            "model_images_per_s": model_images_per_s, "gflops": gflops, "peak_fraction": gflops / peak}


def markdown(results: dict) -> str:
    lines = [
        "## Images: sweeps of conv and MLP k-sparse autoencoders",
        "",
        f"Data: {results['data']}; {results['images_per_run']} training images per model per run, "
        f"batch {results['batch']}. Matmul peak measured here: {results['peak']['gflops']:.0f} GFLOP/s "
        "(float32 2048^3).",
        "",
        "| run | models | train s | test-eval s | compile s | images/s x models | GFLOP/s | % of peak | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['name']} | {r['n_models']} | {r['train_s']:.2f} | {r['eval_s']:.2f} | "
            f"{r['compile_s']:.1f} | {r['model_images_per_s']:.0f} | {r['gflops']:.0f} | "
            f"{100 * r['peak_fraction']:.0f}% | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Ratios (time for the same work; < 1 means ksae_jax is faster):", ""]
    for name, v in results["ratios"].items():
        lines.append(f"- {name}: {v:.2f}")
    for note in results["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def run_suite(args, child) -> dict:
    """The image suite's runs; child(kind, spec, timeout) runs one in a fresh process."""
    if args.quick:
        idx_dir, data_name = synthetic_idx_dir(1800, 1000), "synthetic (quick)"
    elif args.idx_dir or FASHION.is_dir():
        idx_dir = args.idx_dir or FASHION
        data_name = str(idx_dir)
    else:
        idx_dir, data_name = synthetic_idx_dir(60_000, 10_000), "synthetic 60,000 + 10,000"
    batch = 600
    base = {"idx_dir": str(idx_dir), "batch": batch, "threads": args.threads,
            "torch_device": getattr(args, "torch_device", "cpu"),
            "steps": 3 if args.quick else None, "train_limit": 1800 if args.quick else None}
    timeout = 600 if args.quick else 3600
    notes = []
    print("measuring the matmul peak ...", flush=True)
    peak = child("peak", {"n": 256} if args.quick else {}, timeout)
    plan = _plan(args, base, notes)
    runs = []
    for name, kind, spec in plan:
        print(f"running {name} ...", flush=True)
        r = _row(name, spec["arch"], child(kind, spec, timeout), peak["gflops"])
        runs.append(r)
        print(f"  train {r['train_s']:.2f} s, {r['model_images_per_s']:.0f} images/s x models, "
              f"{r['gflops']:.0f} GFLOP/s, compile {r['compile_s']:.1f} s, peak RSS "
              f"{r['peak_rss_mb']:.0f} MB", flush=True)
    return {"peak": peak, "data": data_name, "images_per_run": runs[0]["images"], "batch": batch,
            "runs": runs, "ratios": _ratios(runs, notes), "notes": notes}


MLP_KS = (10, 25, 40, 70, 100)


def _plan(args, base: dict, notes: list) -> list:
    conv = dict(base, arch="conv", ks=list(CONV_KS), l1=1e-4)
    mlp = dict(base, arch="mlp", ks=list(MLP_KS), l1=1e-4)
    plan = [
        ("(a) ksae_jax conv, 5 ks in one sweep", "jax", dict(conv, mode="sweep")),
        ("(b) ksae_jax conv, 5 ks one after another", "jax", dict(conv, mode="sequential")),
        ("ksae_jax conv, 5 ks with vmap's own batching", "jax",
         dict(conv, mode="sweep", batching="vmap")),
        ("(d) ksae_jax mlp 784-1000-784, k = 25", "jax", dict(mlp, ks=[MLP_K], mode="sweep")),
        ("(e) ksae_jax mlp, 5 ks (10 25 40 70 100) in one sweep", "jax", dict(mlp, mode="sweep")),
        ("(f) ksae_jax mlp, the same 5 ks one after another", "jax", dict(mlp, mode="sequential")),
    ]
    if args.quick:
        plan = [p for p in plan if p[0].startswith(("(a)", "(d)"))]
    if args.torch:
        plan.append(("(c) PyTorch original loop (peers/original.py), 5 ks", "torch-conv", conv))
    else:
        notes.append("PyTorch runs skipped: torch is not installed (pip install torch==2.13.0)")
    if args.torch:
        plan.append(("(d) PyTorch mlp 784-1000-784, k = 25", "torch-mlp", dict(mlp, ks=[MLP_K])))
    return plan


def _ratios(runs: list, notes: list) -> dict:
    by = {r["name"][:3]: r for r in runs}
    ratios = {}
    if "(c)" in by:
        c = by["(c)"]["train_s"]  # includes the original's model init and test evaluation
        for key, label in (("(a)", "a/c (one-run sweep / PyTorch loop)"),
                           ("(b)", "b/c (one k after another / PyTorch loop)")):
            if key in by:
                ratios[label] = (by[key]["train_s"] + by[key]["eval_s"]) / c
        notes.append("a/c and b/c compare train + test evaluation (the PyTorch script times both); "
                     "compile time excluded")
    if "(a)" in by and "(b)" in by:
        ratios["conv: one-run sweep / one k after another (a/b)"] = by["(a)"]["train_s"] / by["(b)"]["train_s"]
    if "(e)" in by and "(f)" in by:
        ratios["mlp: one-run sweep / one k after another (e/f)"] = by["(e)"]["train_s"] / by["(f)"]["train_s"]
    mlp = [r for r in runs if r["name"].startswith("(d)")]
    if len(mlp) == 2:
        ratios["mlp: ksae_jax / PyTorch"] = mlp[0]["train_s"] / mlp[1]["train_s"]
    return ratios
