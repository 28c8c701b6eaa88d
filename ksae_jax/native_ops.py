"""Native CPU kernels for the sparse paths' gathers and scatters, the top-k and the
convolutions' patches (native_ops.cc), built once per machine with the host's C++ compiler
and called through `jax.ffi`.

XLA:CPU runs a scatter-add one row at a time into a zeroed buffer. The kernels sort the
B k (latent, row) pairs once and write each output row once, from cache, over XLA's
intra-op threads; the top-k scans each row once against its k-th best so far; the pixel
gather copies (or sums) each image's pixel rows by a table, where XLA's strided slices and
concatenates move a few GB/s. They serve float32 on a single CPU device (`takes`);
everywhere else the XLA ops run. The build goes to $KSAE_JAX_CACHE (default
~/.cache/ksae_jax), keyed by the source, the jaxlib version and the processor, so that a
machine with other vector units builds its own.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax

SOURCE = Path(__file__).with_name("native_ops.cc")
TARGETS = {"ksae_scatter_rows": "KsaeScatterRows", "ksae_gather_sum": "KsaeGatherSum",
           "ksae_gather_dot": "KsaeGatherDot", "ksae_top_k": "KsaeTopK",
           "ksae_pixel_gather": "KsaePixelGather"}
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


def _processor() -> str:
    """The processor's model and vector flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        info = ""
    return platform.machine() + info


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + jaxlib.__version__.encode()
                         + " ".join(FLAGS).encode() + _processor().encode()).hexdigest()[:16]
    root = Path(os.environ.get("KSAE_JAX_CACHE", Path.home() / ".cache" / "ksae_jax"))
    return root / f"native_ops-{key}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler (g++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        part = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(part)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise OSError(f"{compiler} failed: {' | '.join(errors[:3])[:400]}")
        os.replace(part, target)  # whole or not at all, for processes building side by side


@functools.cache
def _load() -> str | None:
    """Builds (once) and registers the kernels; None when they are ready, else why not."""
    if os.environ.get("KSAE_JAX_NATIVE", "1") == "0":
        return "KSAE_JAX_NATIVE=0"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        return f"native kernels unavailable: {e}"
    return None


def unavailable() -> str | None:
    """None when the kernels can serve this process (one CPU device, built), else why not."""
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return "native kernels serve a single CPU device only"
    return _load()


def serves(*arrays: jax.Array) -> bool:
    """Whether the kernels take these operands: float32 and int32 arrays, none empty."""
    ok = {jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}
    return all(a.ndim and a.size and jnp.dtype(a.dtype) in ok for a in arrays)


def takes(*arrays: jax.Array) -> bool:
    """Whether the kernels serve this process and take these operands (where not, the
    callers run their XLA ops: the same results)."""
    return unavailable() is None and serves(*arrays)


def _call(name: str, out, *args: jax.Array):
    if why := _load():
        raise RuntimeError(why)
    return jax.ffi.ffi_call(name, out, vmap_method="sequential")(*args)


def _f32(*shape: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def scatter_rows(coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    return _call("ksae_scatter_rows", _f32(n, rows.shape[1]), coef, idx, rows)


def gather_sum(coef: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    return _call("ksae_gather_sum", _f32(idx.shape[0], table.shape[1]), coef, idx, table)


def gather_dot(rows: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    return _call("ksae_gather_dot", _f32(*idx.shape), rows, idx, table)


def top_k(x: jax.Array, k: int, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """lax.top_k(x + bias, k) of a (B, n) x: the same values and indices, ties and NaNs
    ordered as lax orders them; no gradient (the SAE's selection is a constant)."""
    out = (_f32(x.shape[0], k), jax.ShapeDtypeStruct((x.shape[0], k), jnp.int32))
    return _call("ksae_top_k", out, lax.stop_gradient(x), lax.stop_gradient(bias))


def pixel_gather(src: jax.Array, table) -> jax.Array:
    """out[b, i] = sum_r src[b, table[i, r]] of a float32 (N, P, C) src, skipping entries of
    the int32 (I, R) table outside [0, P): a convolution's patches and their adjoint."""
    table = jnp.asarray(table, jnp.int32)
    return _call("ksae_pixel_gather", _f32(src.shape[0], table.shape[0], src.shape[2]), src, table)
