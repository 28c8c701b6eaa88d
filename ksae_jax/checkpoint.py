"""Files: atomic writes, and versioned params pickles read back without running their code."""
from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

PARAMS_FORMAT = "ksae_jax.params"
PARAMS_VERSION = 1
CHECKPOINT_FORMAT = "ksae_jax.checkpoint"
CHECKPOINT_VERSION = 1

# Exactly what numpy arrays, dtypes and scalars need (numpy 1.x and 2.x module names).
_ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
})


class ParamsFileError(ValueError):
    """A params or checkpoint file is missing, truncated, corrupt, of another version, or unsafe."""


# ---------------------------------------------------------------- atomic writes

def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Writes a file so that it is never seen half written under its final name.

    `write(f)` fills a temporary file in the same folder; it is flushed and fsynced,
    then renamed over `path` (an atomic step), and the folder entry is fsynced.
    """
    path = Path(path)
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


def write_json(path, obj) -> Path:
    return write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_pickle(path, obj) -> Path:
    return atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


# ---------------------------------------------------------------- safe reading

class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only numpy arrays, dtypes and plain containers "
            "are allowed")


def _check_plain(obj, where="file"):
    """Only dicts with str keys, lists, tuples, scalars, None, and non-object numpy arrays."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"non-string key {k!r} in {where}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError(f"object array in {where}")
    elif not (obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic))):
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} in {where}")


def read_pickle(path: str | os.PathLike) -> Any:
    """Reads a pickle with the restricted unpickler; ParamsFileError on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
    except FileNotFoundError:
        raise ParamsFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ParamsFileError(f"{path}: is a directory, not a params file") from None
    except pickle.UnpicklingError as e:
        raise ParamsFileError(f"{path}: not loaded: {e}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, OverflowError) as e:
        raise ParamsFileError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from None
    try:
        _check_plain(obj)
    except pickle.UnpicklingError as e:
        raise ParamsFileError(f"{path}: not loaded: {e}") from None
    return obj


# ---------------------------------------------------------------- params files

def save_params(path, *, config: dict, ks, params: dict, metrics: dict | None = None,
                extra: dict | None = None) -> Path:
    """params.pkl: every model's params (numpy, leading axis = model) with config and metrics."""
    import jax

    payload = {
        "format": PARAMS_FORMAT,
        "version": PARAMS_VERSION,
        "config": config,
        "ks": [int(k) for k in ks],
        "params": jax.tree.map(np.asarray, params),
        "metrics": metrics or {},
        **(extra or {}),
    }
    return write_pickle(path, payload)


def _read_versioned(path, fmt: str, version: int, keys, what: str) -> dict:
    payload = read_pickle(path)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ParamsFileError(f"{path}: not a ksae_jax {what}")
    if payload.get("version") != version:
        raise ParamsFileError(f"{path}: format version {payload.get('version')!r} is not "
                              f"supported (this ksae_jax reads version {version})")
    for key in keys:
        if key not in payload:
            raise ParamsFileError(f"{path}: missing {key!r}")
    return payload


def load_params_file(path) -> dict:
    """The payload of a params.pkl after checking its format and version."""
    return _read_versioned(path, PARAMS_FORMAT, PARAMS_VERSION, ("config", "ks", "params"),
                           "params file")


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, *, config: dict, epoch: int, params, opt_state, history: dict,
                    diverged_at, seconds: float) -> Path:
    """Everything needed to continue a sweep after `epoch` completed epochs.

    The data order of epoch e is drawn from (config seed, e), so the epoch count is the
    whole RNG state. opt_state is stored as its list of leaves.
    """
    import jax

    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
        "epoch": int(epoch), "rng": {"seed": config.get("seed"), "next_epoch": int(epoch)},
        "params": jax.tree.map(np.asarray, params),
        "opt_state": [np.asarray(leaf) for leaf in jax.tree.leaves(opt_state)],
        "history": history, "diverged_at": np.asarray(diverged_at), "seconds": float(seconds),
    }
    return write_pickle(path, payload)


def load_checkpoint(path) -> dict:
    return _read_versioned(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                           ("config", "epoch", "params", "opt_state", "history", "diverged_at",
                            "seconds"), "checkpoint")


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
