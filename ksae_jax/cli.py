"""Command-line plumbing every experiment shares: flags and their parsers, one-line errors
(exit code 2 for the user's mistakes, 1 for a run that failed), image data, output folders,
devices. The order of a run's steps is the runner's (ksae_jax.runner)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ksae_jax import models, sharding
from ksae_jax.data import images as image_data
from ksae_jax.safe_pickle import ParamsFileError

USAGE_ERROR = 2


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class RunFailed(Exception):
    """A run that could not produce its result (e.g. diverged): one line, exit code 1."""


CHECKPOINTS, LEGACY_CHECKPOINT = "checkpoints", "checkpoint.pkl"  # Orbax; ksae_jax 0.2's


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


def unit_float(text: str) -> float:
    v = nonneg_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return v


def add_data_flags(p: argparse.ArgumentParser, default: str = "mnist") -> None:
    """Image data: --dataset, --idx-dir, --train-limit."""
    p.add_argument("--dataset", default=default,
                   help=f"one of {', '.join(image_data.DATASETS)} (TFDS, downloaded on first use; "
                        f"{image_data.SAMPLE!r}: 5,000 real MNIST digits, offline); default {default}")
    p.add_argument("--idx-dir", type=Path, default=None,
                   help="folder with the four MNIST-format IDX files (overrides --dataset)")
    p.add_argument("--train-limit", type=positive_int, default=None, metavar="N",
                   help="use only the first N training images")


def add_budget_flags(p: argparse.ArgumentParser, batch_size: int | None) -> None:
    """--steps or --epochs (exclusive), --batch-size, --eval-every."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=positive_int, default=None, help="optimizer steps")
    g.add_argument("--epochs", type=positive_int, default=None, help="passes over the training data")
    p.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"rows per step (default {batch_size or 'see above'})")
    p.add_argument("--eval-every", type=positive_int, default=None, metavar="STEPS",
                   help="steps between evaluations and checkpoints (default: every epoch, or 10 "
                        "per run when that is more than 20 epochs or less than one)")


def add_auxk_flags(p: argparse.ArgumentParser, aux_coef: float) -> None:
    """AuxK (dead-latent revival): --aux-coef, --aux-k, --dead-tokens."""
    p.add_argument("--aux-coef", type=nonneg_float, default=aux_coef,
                   help=f"weight of the AuxK loss (0: off; default {aux_coef:g})")
    p.add_argument("--aux-k", type=positive_int, default=None,
                   help="dead units that reconstruct the residual (default: input width / 2)")
    p.add_argument("--dead-tokens", type=positive_int, default=None,
                   help="a unit is dead after this many training rows without firing "
                        "(default min(10M, one pass over the data))")


def add_run_flags(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out, --overwrite, --resume, --on-nan, --no-progress."""
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {default_out})")
    p.add_argument("--overwrite", action="store_true", help="replace results in a non-empty --out")
    p.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (same flags as before)")
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="N",
                   help="keep the last N checkpoints (default 2)")
    p.add_argument("--host-params-gb", type=positive_float, default=None, metavar="GB",
                   help="params larger than this are saved sharded, not gathered into one "
                        "params.pkl (default: a quarter of the host's memory)")
    p.add_argument("--on-nan", choices=("stop", "continue"), default="stop",
                   help="when a model's loss becomes NaN/Inf: stop (default) or freeze that "
                        "model and train the others on")
    p.add_argument("--batching", choices=("auto", "loop", "vmap"), default="auto",
                   help="how the models share the compiled step (auto: one after another on "
                        "CPU, vmapped on accelerators and when the mesh splits the models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("devices and hosts")
    g.add_argument("--mesh", default=None, metavar="AXES",
                   help="device mesh, e.g. data=2,model=4 (axes data, model, latent; product = "
                        "device count; default: every device on model when there are at least "
                        "as many models, else on data)")
    g.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host run (jax.distributed.initialize)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="--distributed: process 0's address (default: from the environment)")
    g.add_argument("--num-processes", type=positive_int, default=None)
    g.add_argument("--process-id", type=int_value, default=None)


def check_data_flags(args) -> None:
    """Cheap checks before anything is loaded or trained (no TFDS import for a bad name)."""
    if args.idx_dir is not None and not args.idx_dir.is_dir():
        raise UsageError(f"--idx-dir {args.idx_dir}: no such directory")
    if args.idx_dir is None and args.dataset not in image_data.DATASETS:
        raise UsageError(f"--dataset {args.dataset!r}: unknown dataset (choose from "
                         f"{', '.join(image_data.DATASETS)}, or give --idx-dir)")


FALLBACK_NOTE = (
    "using the offline sample {sample!r} instead (5,000 real MNIST digits). For full MNIST run "
    "once on a machine with network (TFDS downloads it on first use); for Fashion-MNIST offline: "
    "apt-get install dataset-fashion-mnist, then --idx-dir /usr/share/datasets/fashion-mnist")


def load_data(args, log: Callable[[str], None] = print) -> image_data.Dataset:
    """The dataset the flags ask for; the default MNIST falls back to the offline sample."""
    check_data_flags(args)
    try:
        ds = image_data.load(args.dataset, args.idx_dir, args.train_limit)
    except image_data.DatasetUnavailable as e:
        if args.dataset != "mnist" or args.idx_dir is not None:
            raise UsageError(str(e)) from None
        log(f"note: {e}; " + FALLBACK_NOTE.format(sample=image_data.SAMPLE))
        ds = image_data.load(image_data.SAMPLE, None, args.train_limit)
    except image_data.DataError as e:
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
    if not (folder / CHECKPOINTS).is_dir() and not (folder / LEGACY_CHECKPOINT).is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINTS}/ there (nothing to resume)")
    for stale in folder.glob(".*.tmp"):  # partial writes of the interrupted run
        stale.unlink()
    return folder


def check_batch_size(cfg, n_train: int) -> None:
    if cfg.batch_size > n_train:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set "
                         f"({n_train} rows)")


def start_devices(args) -> None:
    """First thing a multi-host run does: join the other processes (--distributed)."""
    if not getattr(args, "distributed", False):
        return
    try:
        sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--distributed: {e}") from None


def device_mesh(args, cfg, log: Callable[[str], None] = print):
    """The mesh the flags ask for (None on one device without --mesh), checked and printed."""
    import jax

    n = jax.device_count()
    if args.mesh is None and n == 1:
        return None
    try:
        axes = sharding.parse_mesh(args.mesh) if args.mesh else sharding.default_axes(n, cfg.n_models)
        sharding.check_axes(axes, n, cfg, models.family(cfg.model).shards_latents)
    except ValueError as e:
        raise UsageError(f"--mesh: {e}") from None
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log(f"mesh: {sharding.format_axes(axes)} over {n} {jax.devices()[0].platform} devices{hosts}")
    return sharding.make_mesh(axes)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None,
        prog: str | None = None) -> None:
    """Runs an experiment's main and exits: 0 (or the int main returns), 2 with one line on
    stderr for a user's mistake, 1 for a run that failed, 130 when interrupted."""
    prog = prog or main.__module__.rsplit(".", 1)[-1]
    if prog == "__main__":
        prog = Path(sys.argv[0]).stem
    try:
        code = main(argv)
    except (UsageError, ParamsFileError, image_data.DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
