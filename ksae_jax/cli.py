"""Shared command-line plumbing: one-line errors with exit code 2, data loading, output folders."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable

from ksae_jax import data
from ksae_jax.checkpoint import ParamsFileError

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line and exit code 2."""

    def error(self, message):
        raise UsageError(message)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def int_value(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    v = nonneg_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return v


def add_data_flags(p: argparse.ArgumentParser, default: str = "mnist") -> None:
    p.add_argument("--dataset", default=default,
                   help=f"TFDS name ({', '.join(data.TFDS_DATASETS)}, ...) or {data.SAMPLE!r} "
                        f"(offline, 5,000 real MNIST digits); default {default}")
    p.add_argument("--idx-dir", type=Path, default=None,
                   help="folder with the four MNIST-format IDX files (overrides --dataset)")
    p.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images")


def check_data_flags(args) -> None:
    """Cheap checks before anything is loaded or trained."""
    if args.idx_dir is not None and not args.idx_dir.is_dir():
        raise UsageError(f"--idx-dir {args.idx_dir}: no such directory")
    if args.idx_dir is None and args.dataset not in data.DATASETS:
        if not data.tfds_knows(args.dataset):
            raise UsageError(f"--dataset {args.dataset!r}: unknown dataset "
                             f"(try {', '.join(data.DATASETS)})")


def load_data(args, log: Callable[[str], None] = print) -> data.Dataset:
    """The dataset the flags ask for; the default MNIST falls back to the offline sample."""
    try:
        ds = data.load(args.dataset, args.idx_dir, args.train_limit)
    except data.DatasetUnavailable as e:
        if args.dataset != "mnist" or args.idx_dir is not None:
            raise UsageError(str(e)) from None
        log(f"note: {e}; using the offline sample {data.SAMPLE!r} instead "
            "(5,000 real MNIST digits)")
        ds = data.load(data.SAMPLE, None, args.train_limit)
    except data.DataError as e:
        raise UsageError(str(e)) from None
    return ds


def prepare_out_dir(path: Path, overwrite: bool) -> Path:
    """Creates --out, refusing a non-empty one without --overwrite and an unwritable one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {path}: directory is not empty (pass --overwrite to replace "
                         "its results)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out {path}: not writable ({e.strerror or e})") from None
    return path


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs an experiment's main; user mistakes become one line on stderr and exit code 2."""
    prog = Path(sys.argv[0]).stem if argv is None else "experiment"
    try:
        code = main(argv)
    except (UsageError, ParamsFileError, data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
