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


class RunFailed(Exception):
    """A run that could not produce its result (e.g. diverged): one line, exit code 1."""


CHECKPOINT = "checkpoint.pkl"


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


def add_run_flags(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --overwrite, --resume, --on-nan, --no-progress."""
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out})")
    p.add_argument("--overwrite", action="store_true", help="replace results in a non-empty --out")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (same flags as before)")
    p.add_argument("--on-nan", choices=("stop", "continue"), default="stop",
                   help="when a model's loss becomes NaN/Inf: stop (default) or freeze that "
                        "model and train the others on")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def output_dir(args, default: str) -> Path:
    """--out (prepared, refused if non-empty without --overwrite), or the --resume folder."""
    if args.resume is None:
        return prepare_out_dir(args.out or Path(default), args.overwrite)
    folder = args.resume
    if args.out is not None and args.out.resolve() != folder.resolve():
        raise UsageError(f"--resume {folder} continues in that folder; drop --out {args.out}")
    if not (folder / CHECKPOINT).is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINT} there (nothing to resume)")
    for stale in folder.glob(".*.tmp"):  # partial writes of the interrupted run
        stale.unlink()
    return folder


def prepare_run(args, cfg, default_out: str):
    """Checks the data flags, prepares the output folder, loads the data: (out, dataset)."""
    check_data_flags(args)
    out = output_dir(args, default=default_out)
    ds = load_data(args)
    if cfg.batch_size > len(ds.x_train):
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set "
                         f"({len(ds.x_train)} images)")
    return out, ds


def train(cfg, ds, out: Path, args, run_info: dict):
    """train_sweep with a checkpoint in `out` after every epoch, resuming when asked."""
    from ksae_jax.train import CheckpointMismatch, Diverged, train_sweep

    try:
        return train_sweep(cfg, ds.x_train, ds.x_test, progress=not args.no_progress,
                           checkpoint=out / CHECKPOINT, resume=args.resume is not None,
                           on_nan=args.on_nan, run_info=run_info)
    except CheckpointMismatch as e:
        raise UsageError(f"--resume {e}") from None
    except Diverged as e:
        raise RunFailed(f"{e}; try a smaller --lr, or --on-nan continue") from None


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    """Runs an experiment's main; user mistakes become one line on stderr and exit code 2."""
    prog = main.__module__.rsplit(".", 1)[-1]
    if prog == "__main__":
        prog = Path(sys.argv[0]).stem
    try:
        code = main(argv)
    except (UsageError, ParamsFileError, data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
