"""Writing files so that a killed run never leaves a half-written one under its final name:
atomic writes of bytes, strict JSON and pickles."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], Any]) -> Path:
    """Writes a file so that it is never seen half written under its final name.

    `write(f)` fills a temporary file in the same folder; it is flushed and fsynced,
    then renamed over `path` (an atomic step), and the folder entry is fsynced. (In a
    multi-host run the caller decides which process writes.)
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
