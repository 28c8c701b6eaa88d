"""Measuring helpers of the benchmarks: child processes (each with its own peak memory), wall
time, the machine's matmul peak, and a description of the machine and the versions."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(fn, reps: int) -> float:
    """Shortest of `reps` timings of fn() (the least disturbed by other work)."""
    return min(timed(fn) for _ in range(reps))


def run_child(module: str, kind: str, spec: dict, timeout: float, cwd: Path) -> dict:
    """`python -m module --child kind JSON` in a fresh process; its last stdout line as JSON."""
    cmd = [sys.executable, "-m", module, "--child", kind, json.dumps(spec)]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_script(cmd: list[str], timeout: float) -> dict:
    """A peer's script whose last stdout line is its JSON result."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def matmul_peak(n: int = 2048, reps: int = 10) -> dict:
    """Best float32 GFLOP/s of an n^3 matmul (the machine's practical peak for JAX)."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n)) for i in (0, 1))
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = best_of(lambda: mm(a, b).block_until_ready(), reps)
    return {"gflops": 2 * n ** 3 / best / 1e9, "device": str(jax.devices()[0]),
            "backend": jax.default_backend()}


def describe_machine() -> dict:
    """The processor (its name and widest vector extension), cores and software."""
    cpu, isa = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                   if line.startswith("model name"))
        flags = set(next(line.split(":", 1)[1].split() for line in info.splitlines()
                         if line.startswith("flags")))
        isa = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "")
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def versions(packages=("jax", "jaxlib", "flax", "optax", "torch", "eai-sparsify")) -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def results_folder() -> Path:
    """benchmarks/results/DATE_MACHINE: where a run on this machine today writes its tables."""
    m = describe_machine()
    name = re.sub(r"[^a-z0-9]+", "-", f"{m['cpu']} {m['isa']}".lower()).strip("-")[:48]
    return (Path(__file__).resolve().parent / "results"
            / f"{datetime.date.today()}_{name}-{m['cores']}core")
