"""The SAE suite of the speed benchmark: ksae_jax's TopK SAE (one model, and a 4-k sweep in
one run) against EleutherAI's sparsify (peers/sparsify_topk.py: its own SparseCoder with the
fused encoder backward and the embedding_bag decoder, trained as its Trainer trains one) on the
same .npy data and threads, with the forward encoder matmul alone as the floor, and held-out
FVU after the same steps.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.measure import best_of, peak_rss_mb, run_script

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "sparsify_topk.py"
SHAPES = {  # --sae-shapes: the configs of a CPU run and of a GPU run
    "cpu": ({"d": 768, "latents": 16384, "k": 32, "batch": 4096},   # GPT-2-small width
            {"d": 512, "latents": 8192, "k": 32, "batch": 4096}),
    "gpu": ({"d": 768, "latents": 16384, "k": 32, "batch": 4096},
            {"d": 4096, "latents": 65536, "k": 64, "batch": 4096})}
QUICK = {"d": 64, "latents": 1024, "k": 8, "batch": 512}
LARGEST = {"d": 4096, "latents": 2 ** 20, "k": 64, "batch": 4096}  # 34 GB of weights, 103 with Adam
SWEEP_KS = (16, 32, 64, 128)
EVAL_ROWS = 8192


def make_data(d: int, rows: int, folder: Path) -> Path:
    """Vectors with known sparse structure (2d features, about 16 active per vector)."""
    from ksae_jax.data import synthetic
    path = folder / f"acts_d{d}.npy"
    if not path.exists():
        np.save(path, synthetic.generate(rows, d=d, n_features=2 * d, mean_active=16, decay=0.999,
                                         noise=0.05, seed=0).x)
    return path


# ---------------------------------------------------------------- child process: ksae_jax

def child_sae(spec: dict) -> dict:
    """ksae_jax on spec's data: compile, warm-up, timed steps, held-out FVU, the floor."""
    import jax
    import jax.numpy as jnp

    from ksae_jax import batching, prepare, sae_config
    from ksae_jax.data import vectors
    from ksae_jax.evaluate import EvalSet, evaluate
    from ksae_jax.models.layers import matmul
    from ksae_jax.models.topk import sparse_path

    src = vectors.open_vectors(spec["data"])
    tr, held = src.view(0, src.n - EVAL_ROWS), src.view(src.n - EVAL_ROWS, src.n)
    cfg = sae_config(src.d, tuple(spec["ks"]), latents=spec["latents"], batch_size=spec["batch"],
                     steps=spec["steps"], decoder=spec.get("decoder", "auto"),
                     batching=spec.get("batching", "auto"), dead_tokens=10_000_000,
                     dtype=spec.get("dtype", "float32"))
    run = prepare(cfg, tr, feeder="device")
    state, sums, ks = run.state, run.zero_sums(), run.ks_at(0)
    t = time.perf_counter()
    step = run.compile(next(run.batches))
    compile_s = time.perf_counter() - t
    for i in range(spec["steps"]):
        if i == spec["warmup"]:
            jax.block_until_ready(sums)
            t = time.perf_counter()
        state, sums = step(state, sums, next(run.batches), ks, np.int32(i))
    jax.block_until_ready(sums)
    timed_steps = spec["steps"] - spec["warmup"]
    seconds_per_step = (time.perf_counter() - t) / timed_steps
    final = evaluate(run.run_cfg, state.params, EvalSet(held))
    out = {"dtype": cfg.model.dtype, "device": str(jax.devices()[0].platform),
           "path": sparse_path(cfg.model, max(cfg.ks)),
           "peak_device_gb": _peak_device_gb(), "seconds_per_step": seconds_per_step,
           "vectors_per_s": spec["batch"] * len(cfg.ks) / seconds_per_step,  # x models
           "compile_s": compile_s, "eval_fvu": final.fvu.tolist(), "dead_fraction_eval":
           final.dead_frac.tolist(), "peak_rss_mb": peak_rss_mb(), "ks": list(cfg.ks)}
    if spec.get("floor"):
        x = jnp.asarray(tr.read(0, spec["batch"]))
        w = batching.take(state.params, 0)["W_enc"]
        mm = jax.jit(lambda a, b: matmul(a, b.T, cfg.model.dtype))
        mm(x, w).block_until_ready()
        out["floor_seconds"] = best_of(lambda: mm(x, w).block_until_ready(), 3)
    return out


def _peak_device_gb():
    """Peak bytes the first device held (None where the backend keeps no such count, as on CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in stats else None


def child_peer(spec: dict) -> dict:
    """sparsify on spec's data (peers/sparsify_topk.py, in a process of its own)."""
    return run_script([sys.executable, str(PEER), "--data", spec["data"], "--latents",
                       str(spec["latents"]), "--k", str(spec["k"]), "--batch-size",
                       str(spec["batch"]), "--steps", str(spec["steps"]), "--warmup",
                       str(spec["warmup"]), "--threads", str(spec["threads"]),
                       "--eval-n", str(EVAL_ROWS)], timeout=3600)


CHILDREN = {"sae": child_sae, "sparsify": child_peer}


# ---------------------------------------------------------------- the suite

def _peer(child, data: Path, c: dict, k: int, steps: int, warmup: int, threads: int) -> dict:
    return child("sparsify", dict(data=str(data), latents=c["latents"], k=k, batch=c["batch"],
                                  steps=steps, warmup=warmup, threads=threads), 3600)


def run_config(c: dict, data: Path, args, child, peer: Path | None) -> dict:
    """One shape's runs: (a) one model, (b) the 4-k sweep, (e) the dense path, (x) the sparse
    path on XLA's gathers and scatters (what "auto" takes off CPU: the native kernels' before),
    in each of args.dtypes ("a" and "b" carry the dtype's name past float32), and sparsify (c)."""
    steps, warmup = args.sae_run
    base = dict(data=str(data), latents=c["latents"], batch=c["batch"], steps=steps, warmup=warmup)
    rows = {}
    for dtype in args.dtypes:
        tag = "" if dtype == "float32" else f"_{dtype}"
        spec = dict(base, dtype=dtype)
        print(f"  (a) ksae_jax one model, k = {c['k']}, {dtype} ...", flush=True)
        rows["a" + tag] = child("sae", dict(spec, ks=[c["k"]], floor=True), 3600)
        print(f"  (b) ksae_jax {len(SWEEP_KS)}-k sweep {SWEEP_KS}, {dtype} ...", flush=True)
        rows["b" + tag] = child("sae", dict(spec, ks=list(SWEEP_KS)), 3600)
    print("  (e) ksae_jax one model, dense reference path ...", flush=True)
    rows["e"] = child("sae", dict(base, ks=[c["k"]], decoder="dense"), 3600)
    print("  (x) ksae_jax one model, sparse path on XLA ops ...", flush=True)
    rows["x"] = child("sae", dict(base, ks=[c["k"]], decoder="sparse"), 3600)
    if peer is not None:
        print(f"  (c) sparsify, k = {c['k']} and the {len(SWEEP_KS)} ks one after another ...", flush=True)
        rows["c1"] = _peer(child, data, c, c["k"], steps, warmup, args.threads)
        if not args.quick:  # the smoke test runs the peer once
            rows["c4"] = [_peer(child, data, c, k, steps, warmup, args.threads) for k in SWEEP_KS]
    return rows


def summarize(c: dict, rows: dict) -> dict:
    a, b, e = rows["a"], rows["b"], rows["e"]
    s = {"one_model_step_s": a["seconds_per_step"], "floor_s": a["floor_seconds"],
         "one_model_over_floor": a["seconds_per_step"] / a["floor_seconds"],
         "sweep_step_s": b["seconds_per_step"],
         "sweep_over_one_model": b["seconds_per_step"] / a["seconds_per_step"],
         "fvu_sparse_vs_dense": a["eval_fvu"][0] / e["eval_fvu"][0] - 1,
         "xla_sparse_step_over_one_model": rows["x"]["seconds_per_step"] / a["seconds_per_step"],
         "sweep_rss_over_one_model": b["peak_rss_mb"] / a["peak_rss_mb"]}
    if "a_bfloat16" in rows:
        h = rows["a_bfloat16"]
        s.update({"bf16_step_over_f32": h["seconds_per_step"] / a["seconds_per_step"],
                  "bf16_over_its_floor": h["seconds_per_step"] / h["floor_seconds"],
                  "bf16_fvu_over_f32": h["eval_fvu"][0] / a["eval_fvu"][0] - 1})
    if "c1" in rows:
        c1 = rows["c1"]
        s.update({"vectors_per_s_over_sparsify": a["vectors_per_s"] / c1["vectors_per_s"],
                  "rss_over_sparsify": a["peak_rss_mb"] / c1["peak_rss_mb"],
                  "fvu_vs_sparsify": a["eval_fvu"][0] / c1["eval_fvu"] - 1})
    if "c4" in rows:
        sequential = sum(r["seconds_per_step"] for r in rows["c4"])
        s.update({"sparsify_4k_sequential_step_s": sequential,
                  "sweep_speedup_over_sparsify_sequential": sequential / b["seconds_per_step"]})
    return s


def data_folder(args) -> Path:
    """Where the generated vectors go: the run's own folder (so that a resumed run finds the
    same files), else a temporary one."""
    folder = getattr(args, "data_dir", None) or Path(tempfile.mkdtemp(prefix="ksae_bench_sae_"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def run_suite(args, child) -> dict:
    folder = data_folder(args)
    peer = PEER if args.torch and importlib.util.find_spec("sparsify") is not None else None
    args.sae_run = steps, warmup = (4, 1) if args.quick else (args.sae_steps, 3)
    configs = (QUICK,) if args.quick else SHAPES[args.sae_shapes]
    out = {"steps": steps, "warmup": warmup, "threads": args.threads, "sweep_ks": list(SWEEP_KS),
           "dtypes": list(args.dtypes),
           "peer": f"sparsify ({peer.relative_to(ROOT)})" if peer else None,
           "configs": []}
    for c in configs:
        print(f"SAE d = {c['d']}, n = {c['latents']}, k = {c['k']}, batch {c['batch']}", flush=True)
        data = make_data(c["d"], steps * c["batch"] + EVAL_ROWS + c["batch"], folder)
        rows = run_config(c, data, args, child, peer)
        out["configs"].append({**c, "runs": rows, "summary": summarize(c, rows)})
    if not peer:
        out["note"] = ("sparsify's rows skipped: install the peer with `pip install torch==2.13.0 "
                       "eai-sparsify`")
    return out


def run_largest(args, child) -> dict:
    """One model at the largest single-device shape (QUICK's with --quick): two steps, the
    second timed, or the error that stopped it (out of memory, say)."""
    c = QUICK if args.quick else LARGEST
    folder = data_folder(args)
    data = make_data(c["d"], 2 * c["batch"] + EVAL_ROWS, folder)
    spec = dict(data=str(data), latents=c["latents"], batch=c["batch"], steps=2, warmup=1,
                ks=[c["k"]], dtype=args.dtypes[-1])
    try:
        return {**c, "run": child("sae", spec, 1800)}
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # the machine's limit is a result
        return {**c, "run": None, "error": str(e)[-2000:]}


def markdown(results: dict) -> str:
    lines = ["## Vectors: TopK SAEs against sparsify", "",
             f"{results['steps']} steps per run ({results['warmup']} untimed), {results['threads']} "
             f"threads, same .npy data; held-out FVU on the last {EVAL_ROWS} rows. Sweep: k = "
             f"{', '.join(map(str, results['sweep_ks']))} in one run.", ""]
    for c in results["configs"]:
        r, s = c["runs"], c["summary"]
        lines += [f"### d = {c['d']}, n = {c['latents']}, k = {c['k']}, batch {c['batch']}", "",
                  "| run | s / step | vectors/s x models | compile s | held-out FVU | peak RSS MB |",
                  "|---|---:|---:|---:|---:|---:|"]

        def row(name, x, fvu=None):
            f = x["eval_fvu"] if fvu is None else fvu
            f = f[0] if isinstance(f, list) and len(f) == 1 else f
            fs = ", ".join(f"{v:.4f}" for v in f) if isinstance(f, list) else f"{f:.4f}"
            lines.append(f"| {name} | {x['seconds_per_step']:.3f} | {x['vectors_per_s']:.0f} | "
                         f"{x.get('compile_s', 0):.1f} | {fs} | {x['peak_rss_mb']:.0f} |")

        row(f"(a) ksae_jax, k = {c['k']}", r["a"])
        row("(b) ksae_jax, 4-k sweep in one run", r["b"])
        for dtype in results.get("dtypes", ["float32"])[1:]:
            row(f"(a) ksae_jax, k = {c['k']}, {dtype}", r[f"a_{dtype}"])
            row(f"(b) ksae_jax, 4-k sweep, {dtype}", r[f"b_{dtype}"])
            lines.append(f"| (d) floor in {dtype} | {r[f'a_{dtype}']['floor_seconds']:.3f} | | | | |")
        if "c1" in r:
            row(f"(c) sparsify, k = {c['k']}", r["c1"])
        if "c4" in r:
            seq = sum(x["seconds_per_step"] for x in r["c4"])
            fvus = ", ".join(f"{x['eval_fvu']:.4f}" for x in r["c4"])
            rss = max(x["peak_rss_mb"] for x in r["c4"])
            lines.append(f"| (c) sparsify, the 4 ks one after another | {seq:.3f} | "
                         f"{c['batch'] * 4 / seq:.0f} | | {fvus} | {rss:.0f} |")
        lines.append(f"| (d) floor: the encoder matmul alone | {r['a']['floor_seconds']:.3f} | | | | |")
        row(f"(e) ksae_jax, k = {c['k']}, dense reference path", r["e"])
        row(f"(x) ksae_jax, k = {c['k']}, sparse path on XLA ops", r["x"])
        lines += ["", *(f"- {k.replace('_', ' ')}: {v:.3f}" for k, v in s.items()), ""]
    if results.get("note"):
        lines.append(f"Note: {results['note']}")
    return "\n".join(lines) + "\n"


def markdown_largest(r: dict) -> str:
    head = f"## The largest single-device SAE: d = {r['d']}, n = {r['latents']}, k = {r['k']}\n\n"
    if r["run"] is None:
        return head + f"Did not run: {r['error'].strip().splitlines()[-1]}\n"
    x = r["run"]
    mem = "" if x["peak_device_gb"] is None else f", peak device memory {x['peak_device_gb']:.1f} GB"
    return head + (f"{x['seconds_per_step']:.3f} s per step ({x['dtype']}, {x['device']}), "
                   f"compile {x['compile_s']:.1f} s{mem}.\n")
