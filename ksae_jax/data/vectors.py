"""Vector data (N, d) for the TopK SAEs: one .npy file (memory-mapped, never read whole), a
folder of .npy shards of equal d (in name order), or an array passed from Python. Checked on
opening: 2-D, a float dtype, non-empty, complete, finite (or non-finite rows dropped)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ksae_jax.data.images import DataError

SCAN_ROWS = 65536      # rows per chunk of the checking scan
MAX_EVAL_ROWS = 65536  # the held-out tail is at most this long
SPREAD_TOLERANCE = 1e-10  # held-out variance below this fraction of the rows' energy: refused


class VectorSource:
    """Rows of one or more (n_i, d) float arrays, read as one (N, d) float32 array.

    `skip` holds sorted physical rows left out (non-finite ones, when asked); row i of the
    source is the i-th row not skipped. `view(start, stop)` is a range of rows.
    """

    def __init__(self, parts: list, names: list[str], skip: np.ndarray | None = None,
                 start: int = 0, stop: int | None = None, scale: float = 1.0):
        self.parts, self.names = parts, names
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.skip = np.zeros(0, np.int64) if skip is None else skip
        total = int(self.offsets[-1]) - len(self.skip)
        self.start, self.stop = start, total if stop is None else stop
        self.n = self.stop - self.start
        self.d = int(parts[0].shape[1])
        self.row_shape = (self.d,)
        self.scale = float(scale)
        self.nbytes = self.n * self.d * 4

    @property
    def name(self) -> str:
        return self.names[0] if len(self.names) == 1 else f"{Path(self.names[0]).parent}/"

    def view(self, start: int, stop: int, scale: float | None = None) -> VectorSource:
        return VectorSource(self.parts, self.names, self.skip, self.start + start,
                            self.start + stop, self.scale if scale is None else scale)

    def physical(self, rows: np.ndarray) -> np.ndarray:
        """Physical row numbers of logical rows (skipping self.skip)."""
        rows = np.asarray(rows, np.int64) + self.start
        if len(self.skip):
            rows = rows + np.searchsorted(self.skip - np.arange(len(self.skip)), rows, side="right")
        return rows

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows (logical numbers, best sorted: reads follow the files)."""
        phys = self.physical(rows)
        part = np.searchsorted(self.offsets, phys, side="right") - 1
        out = np.empty((len(phys), self.d), np.float32)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][phys[sel] - self.offsets[p]]
        return out

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.take(np.arange(start, stop))

    def all(self) -> np.ndarray:
        return self.read(0, self.n)


def _open_npy(path: Path):
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file (truncated or corrupt?): {e}") from None
    if not isinstance(a, np.ndarray):
        raise DataError(f"{path}: not a single .npy array")
    return a


def _check_array(a, name: str, d: int | None = None) -> None:
    if a.ndim != 2:
        raise DataError(f"{name}: expected a 2-D array (N, d), got shape {a.shape}")
    if a.dtype.kind != "f":
        raise DataError(f"{name}: expected float vectors, got dtype {a.dtype}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{name}: empty array of shape {a.shape}")
    if d is not None and a.shape[1] != d:
        raise DataError(f"{name}: rows of width {a.shape[1]}, but the first shard has d = {d}")


def open_vectors(data, *, skip_nonfinite: bool = False, scan: bool = True,
                 log=print) -> VectorSource:
    """A checked VectorSource from a .npy path, a folder of .npy shards, or an array.
    scan=False reads only the headers (shapes and dtypes), not the rows (NaN / Inf)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataError(f"{path}: no .npy files in this folder")
        elif path.exists():
            files = [path]
        else:
            raise DataError(f"{path}: no such file or folder")
        parts, names = [_open_npy(f) for f in files], [str(f) for f in files]
    else:
        parts, names = [np.asarray(data)], ["array"]
    for a, name in zip(parts, names):
        _check_array(a, name, parts[0].shape[1] if a is not parts[0] else None)
    source = VectorSource(parts, names)
    if not scan:
        return source
    bad = nonfinite_rows(source)
    if len(bad):
        where = _locate(source, int(bad[0]))
        if not skip_nonfinite:
            raise DataError(f"{where}: {len(bad)} row(s) hold NaN or Inf (the first shown); "
                            "pass --skip-nonfinite to drop them")
        if len(bad) == source.n:
            raise DataError(f"{source.name}: every row holds NaN or Inf")
        log(f"note: dropped {len(bad)} row(s) holding NaN or Inf (the first: {where})")
        source = VectorSource(parts, names, skip=bad)
    return source


def _locate(source: VectorSource, phys: int) -> str:
    p = int(np.searchsorted(source.offsets, phys, side="right")) - 1
    return f"{source.names[p]} row {phys - int(source.offsets[p])}"


def nonfinite_rows(source: VectorSource) -> np.ndarray:
    """Physical rows holding NaN or Inf, by a chunked scan (one read of the data)."""
    bad = []
    for p, a in enumerate(source.parts):
        for i in range(0, len(a), SCAN_ROWS):
            chunk = np.asarray(a[i:i + SCAN_ROWS])
            rows = np.flatnonzero(~np.isfinite(chunk).all(axis=1))
            if len(rows):
                bad.append(rows + i + source.offsets[p])
    return np.concatenate(bad) if bad else np.zeros(0, np.int64)


def mean_sq_norm(source: VectorSource) -> float:
    """Mean squared L2 norm of the rows (float64 sums over chunks)."""
    total = 0.0
    for i in range(0, source.n, SCAN_ROWS):
        chunk = source.read(i, min(i + SCAN_ROWS, source.n)).astype(np.float64)
        total += float(np.einsum("ij,ij->", chunk, chunk))
    return total / source.n


class Split(NamedTuple):
    train: VectorSource
    eval: VectorSource


def normalizing_scale(source: VectorSource) -> float:
    """The constant that scales the rows to a mean squared norm of d."""
    msn = mean_sq_norm(source)
    if not msn > 0:
        raise DataError(f"{source.name}: every training row is zero; normalize cannot scale it")
    return (source.d / msn) ** 0.5


def check_spread(rows: np.ndarray, name: str) -> None:
    """DataError when held-out rows do not vary (one row, identical rows, all zero): their
    FVU, error over variance, would be undefined."""
    x = np.asarray(rows, np.float64).reshape(len(rows), -1)
    variance = float(((x - x.mean(axis=0)) ** 2).sum())
    if not variance > SPREAD_TOLERANCE * max(float((x ** 2).sum()), 1e-300):
        raise DataError(f"{name}: the {len(x):,} held-out rows do not vary (all equal"
                        f"{', all zero' if not x.any() else ''}): FVU would be undefined; give "
                        "held-out rows that vary")


def split(source: VectorSource, eval_source: VectorSource | None = None,
          eval_frac: float = 0.05) -> Split:
    """Training rows and held-out rows: eval_source, or else the last eval_frac of the data
    (at most MAX_EVAL_ROWS)."""
    if eval_source is None:
        n_eval = min(int(round(eval_frac * source.n)), MAX_EVAL_ROWS)
        if not 0 < n_eval < source.n:
            raise DataError(f"{source.name}: {source.n} rows leave no held-out set at eval "
                            f"fraction {eval_frac} (give --eval-data, or more rows)")
        held = source.view(source.n - n_eval, source.n)
        check_spread(held.all(), source.name)
        return Split(source.view(0, source.n - n_eval), held)
    if eval_source.d != source.d:
        raise DataError(f"{eval_source.name}: rows of width {eval_source.d}, but the "
                        f"training data have d = {source.d}")
    check_spread(eval_source.all(), eval_source.name)
    return Split(source, eval_source)


@dataclasses.dataclass(frozen=True)
class VectorData:
    """The vectors a run trains on, and those it holds out."""

    data: Path
    """One .npy file (memory-mapped, never read whole) or a folder of .npy shards of equal d
    (in name order)."""
    eval_data: Path | None = None
    """Held-out .npy file or folder (default: the last eval_frac of data)."""
    eval_frac: float = 0.05
    """Held out from the end of data when there is no eval_data (at most 65,536 rows)."""
    skip_nonfinite: bool = False
    """Drop rows holding NaN or Inf instead of refusing the data."""

    def __post_init__(self):
        if not 0 < self.eval_frac < 1:
            raise ValueError(f"eval_frac must lie in (0, 1), got {self.eval_frac!r}")

    @property
    def d(self) -> int:
        """The vectors' width, read from the files' headers."""
        return open_vectors(self.data, scan=False).d

    def open(self) -> Split:
        """The training and held-out rows, checked."""
        source = open_vectors(self.data, skip_nonfinite=self.skip_nonfinite)
        held = None if self.eval_data is None else open_vectors(
            self.eval_data, skip_nonfinite=self.skip_nonfinite)
        return split(source, held, self.eval_frac)

    def info(self, n_train: int) -> dict:
        """What metrics.json and the checkpoints record of the data."""
        return {"data": str(self.data), "eval_data": str(self.eval_data) if self.eval_data else None,
                "eval_frac": self.eval_frac, "n_train": n_train}
