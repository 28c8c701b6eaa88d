"""Files: atomic writes, and versioned, checksummed params pickles read back without running
their code.

The reader is a pure-Python unpickler that resolves only the numpy callables an array, a
dtype or a scalar needs (each wrapped to refuse object dtypes before numpy sees them), then
checks the structure once per object (cycles, depth, and the size the structure would
expand to: shared-reference "billion laughs" bombs), then the SHA-256 of the payload.
Anything unexpected, whatever exception it raises, becomes ParamsFileError naming the file.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

PARAMS_FORMAT = "ksae_jax.params"
PARAMS_VERSION = 2           # 2: SHA-256 of the payload; 1 (no checksum) is still read
CHECKPOINT_FORMAT = "ksae_jax.checkpoint"
CHECKPOINT_VERSION = 2       # 2: step-based train state
MAX_DEPTH = 64               # containers nested deeper than this are refused
MAX_NODES = 1_000_000        # ... and structures that expand to more objects than this


class ParamsFileError(ValueError):
    """A params or checkpoint file is missing, truncated, corrupt, of another version, or unsafe."""


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Writes a file so that it is never seen half written under its final name.

    `write(f)` fills a temporary file in the same folder; it is flushed and fsynced,
    then renamed over `path` (an atomic step), and the folder entry is fsynced. In a
    multi-host run only process 0 writes.
    """
    path = Path(path)
    from ksae_jax.sharding import is_writer
    if not is_writer():
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def strict_json(obj):
    """obj with NaN and +-Inf floats replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path, obj) -> Path:
    """Strict JSON (non-finite numbers written as null), atomically."""
    return write_bytes(path, (json.dumps(strict_json(obj), indent=1, allow_nan=False) + "\n").encode())


def write_pickle(path, obj) -> Path:
    return atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


# ---------------------------------------------------------------- safe reading

def _refuse_object_dtype(dt) -> np.dtype:
    if not isinstance(dt, np.dtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(dt).__name__}")
    if dt.hasobject:
        raise pickle.UnpicklingError(f"refused dtype {dt} (it holds Python objects)")
    return dt


_NDARRAY = object()  # what "numpy.ndarray" resolves to: usable only as _reconstruct's class


def _safe_dtype(*args):
    return _refuse_object_dtype(np.dtype(*args))


def _safe_reconstruct(cls, shape, dtype_code):
    """numpy's array pickles start from an empty array whose state BUILD sets."""
    if cls is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("_reconstruct of something other than an empty ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _refuse_object_dtype(np.dtype(dtype_code)))


def _safe_scalar(dtype, *data):
    from numpy._core.multiarray import scalar
    return scalar(_refuse_object_dtype(dtype), *data)


def _safe_frombuffer(buf, dtype, shape, order):
    from numpy._core.numeric import _frombuffer
    return _frombuffer(buf, _refuse_object_dtype(dtype), shape, order)


_ALLOWED = {"ndarray": _NDARRAY, "dtype": _safe_dtype, "_reconstruct": _safe_reconstruct,
            "scalar": _safe_scalar, "_frombuffer": _safe_frombuffer}
_NUMPY_MODULES = {"numpy": ("ndarray", "dtype"),
                  "numpy._core.multiarray": ("_reconstruct", "scalar"),
                  "numpy.core.multiarray": ("_reconstruct", "scalar"),
                  "numpy._core.numeric": ("_frombuffer",), "numpy.core.numeric": ("_frombuffer",)}


class _SafeUnpickler(pickle._Unpickler):  # the Python one: its BUILD can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if name in _NUMPY_MODULES.get(module, ()):
            return _ALLOWED[name]
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only numpy arrays, dtypes and plain containers "
            "are allowed")

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if not isinstance(inst, (np.ndarray, np.dtype)):
            raise pickle.UnpicklingError(f"refused to set the state of a {type(inst).__name__}")
        if isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or not any(isinstance(s, np.dtype) for s in state):
                raise pickle.UnpicklingError("malformed array state")
            for s in state:
                if isinstance(s, np.dtype):
                    _refuse_object_dtype(s)
                elif isinstance(s, list):
                    raise pickle.UnpicklingError("array data given as a list (object array)")
        pickle._Unpickler.load_build(self)
        if isinstance(inst, np.dtype):
            _refuse_object_dtype(inst)

    dispatch[pickle.BUILD[0]] = load_build


def _check_plain(root) -> None:
    """Only dicts with str keys, lists, tuples, scalars, None and numeric numpy arrays; no
    cycles, at most MAX_DEPTH deep, expanding to at most MAX_NODES objects (shared
    references counted as often as they are reached). Each object is visited once."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, 0, False)]
    while stack:
        obj, depth, leaving = stack.pop()
        if isinstance(obj, (dict, list, tuple)):
            oid = id(obj)
            children = list(obj.values()) if isinstance(obj, dict) else obj
            if leaving:
                on_path.discard(oid)
                size[oid] = 1 + sum(size.get(id(c), 1) for c in children)
                if size[oid] > MAX_NODES:
                    raise pickle.UnpicklingError(
                        f"structure expands to more than {MAX_NODES:,} objects (a reference bomb?)")
                continue
            if oid in size:
                continue
            if oid in on_path:
                raise pickle.UnpicklingError("a container that contains itself")
            if depth >= MAX_DEPTH:
                raise pickle.UnpicklingError(f"containers nested more than {MAX_DEPTH} deep")
            if isinstance(obj, dict) and not all(isinstance(k, str) for k in obj):
                raise pickle.UnpicklingError("a dict with non-string keys")
            on_path.add(oid)
            stack.append((obj, depth, True))
            stack.extend((c, depth + 1, False) for c in children)
        elif isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
                raise pickle.UnpicklingError(f"array of dtype {obj.dtype}")
        elif not (obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic))):
            raise pickle.UnpicklingError(f"unexpected {type(obj).__name__}")


def read_pickle(path: str | os.PathLike) -> Any:
    """Reads a pickle with the restricted unpickler; ParamsFileError on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
        _check_plain(obj)
    except FileNotFoundError:
        raise ParamsFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ParamsFileError(f"{path}: is a directory, not a params file") from None
    except pickle.UnpicklingError as e:
        raise ParamsFileError(f"{path}: not loaded: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile file raises
        raise ParamsFileError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from None
    return obj


# ---------------------------------------------------------------- checksums

def digest(obj) -> str:
    """SHA-256 of a plain structure (as _check_plain allows), dict keys in sorted order."""
    h = hashlib.sha256()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            h.update(b"{%d" % len(o))
            for k in sorted(o, reverse=True):
                stack += [o[k], k]
        elif isinstance(o, (list, tuple)):
            h.update(b"[%d" % len(o))
            stack += reversed(o)
        elif isinstance(o, (np.ndarray, np.generic)):
            a = np.ascontiguousarray(o)
            h.update(f"a{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())
    return h.hexdigest()


def with_digest(payload: dict) -> dict:
    return {**payload, "sha256": digest(payload)}


def _verify_digest(path, payload: dict) -> None:
    stored = payload.get("sha256")
    body = {k: v for k, v in payload.items() if k != "sha256"}
    if stored != digest(body):
        raise ParamsFileError(f"{path}: checksum mismatch: the file was changed or damaged "
                              "after it was written")


# ---------------------------------------------------------------- params files

def save_params(path, *, config: dict, ks, params: dict, metrics: dict | None = None,
                extra: dict | None = None) -> Path:
    """params.pkl: every model's params (numpy, leading axis = model) with config, metrics
    and a SHA-256 of the whole payload."""
    import jax

    payload = {
        "format": PARAMS_FORMAT,
        "version": PARAMS_VERSION,
        "config": config,
        "ks": [int(k) for k in ks],
        "params": jax.tree.map(np.asarray, params),
        "metrics": strict_json(metrics or {}),
        **(extra or {}),
    }
    return write_pickle(path, with_digest(payload))


def _read_versioned(path, fmt: str, versions, keys, what: str) -> dict:
    payload = read_pickle(path)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ParamsFileError(f"{path}: not a ksae_jax {what}")
    version = payload.get("version")
    if version not in versions:
        raise ParamsFileError(f"{path}: format version {version!r} is not supported (this "
                              f"ksae_jax reads version {' and '.join(map(str, versions))})")
    for key in keys:
        if key not in payload:
            raise ParamsFileError(f"{path}: missing {key!r}")
    if version >= 2:
        _verify_digest(path, payload)
    return payload


def load_params_file(path) -> dict:
    """The payload of a params.pkl after checking format, version and checksum (version 1
    files carry no checksum: payload["checksum"] says which)."""
    payload = _read_versioned(path, PARAMS_FORMAT, (1, PARAMS_VERSION),
                              ("config", "ks", "params"), "params file")
    payload["checksum"] = "sha256" if "sha256" in payload else "none (version 1 file)"
    return payload


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, *, config: dict, step: int, state, history: dict,
                    seconds: float) -> Path:
    """Everything needed to continue a sweep after `step` steps: the train state's leaves
    (params, Adam states, dead-latent counters, divergence steps), the history so far and
    the config. The data order is a function of (seed, step), so the step is the RNG state."""
    import jax

    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
        "step": int(step), "state": [np.asarray(leaf) for leaf in jax.tree.leaves(state)],
        "history": strict_json(history), "seconds": float(seconds),
    }
    return write_pickle(path, with_digest(payload))


def load_checkpoint(path) -> dict:
    return _read_versioned(path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,),
                           ("config", "step", "state", "history", "seconds"), "checkpoint")


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: saved vs current' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != \
                (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out
