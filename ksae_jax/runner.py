"""The experiment runner. An experiment is its flags, its data, its config and its report (an
`Experiment`); `main(experiment)` runs the steps every experiment shares, in this order:

1. flags (one line and exit code 2 for a mistake), devices (multi-host start);
2. the config from the flags and a cheap description of the data, so that a bad flag ends
   the run before any data is read (every config error: one line, exit code 2);
3. the data, checked; the batch size against it; the device mesh;
4. the output folder (removed again if the run fails before writing anything into it);
5. `train.prepare`, the announcement of its budget and batching, training;
6. the experiment's report (metrics, params, figures, tables), by process 0 only.
"""
from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import jax

from ksae_jax import cli, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.safe_pickle import ParamsFileError
from ksae_jax.train import (
    AllDiverged,
    CheckpointMismatch,
    Diverged,
    SweepResult,
    Training,
    prepare,
)


class Data(NamedTuple):
    """An experiment's data: what training reads, what it evaluates on, and what to record."""

    train: Any
    test: Any
    spec: dict     # what config() depends on (e.g. {"d": 512}), as loaded
    n_train: int
    info: dict     # recorded in the checkpoint (run_info) and required to match on resume
    name: str = ""  # what the data are called in messages and files
    extra: Any = None  # whatever else the experiment's report needs (labels, generator, ...)


class Run(NamedTuple):
    """Everything a report may read about a finished run."""

    args: Any
    cfg: SweepConfig
    data: Data
    out: Path
    plan: dict          # the announced budget, batching and mesh (for metrics.json)
    training: Training
    result: SweepResult


class Experiment:
    """What an experiment gives the runner; subclass and fill in."""

    name = "experiment"   # python -m experiments.<name>; outputs in runs/<name> by default
    doc = ""

    @property
    def default_out(self) -> str:
        return f"runs/{self.name}"

    def add_flags(self, p: cli.Parser) -> None:
        raise NotImplementedError

    def check_flags(self, args) -> None:
        """Refusals that need the flags only (cli.UsageError)."""

    def run_instead(self, args) -> bool:
        """Something the flags ask for instead of training (e.g. a compiled plan); True when
        it was done."""
        return False

    def describe(self, args) -> dict:
        """What config() needs to know of the data, found without reading it."""
        return {}

    def config(self, args, spec: dict) -> SweepConfig:
        raise NotImplementedError

    def load(self, args) -> Data:
        raise NotImplementedError

    def train_options(self, args, data: Data) -> dict:
        """Extra keyword arguments of train.prepare (e.g. feeder)."""
        return {}

    def on_eval(self, args, training: Training):
        """What training calls at every evaluation point, (step, stacked params) -> None
        (e.g. snapshots for learning curves); None: nothing."""
        return None

    def summary(self, run_cfg: SweepConfig, data: Data, training: Training) -> str:
        """The line printed before training starts."""
        return ""

    def report(self, run: Run) -> None:
        raise NotImplementedError

    def parser(self) -> cli.Parser:
        p = cli.Parser(prog=f"python -m experiments.{self.name}",
                       description=self.doc.split("\n\n")[0])
        self.add_flags(p)
        return p

    def parse(self, argv) -> Any:
        return self.parser().parse_args(argv)


def main(experiment: Experiment, argv: list[str] | None = None) -> None:
    """Runs an experiment from the command line (exit codes: 0, 1 failed run, 2 mistake)."""
    cli.run(functools.partial(execute, experiment), argv, prog=experiment.name)


def execute(experiment: Experiment, argv: list[str] | None = None) -> Run | None:
    """The steps of the module docstring; returns the finished run (None when the flags
    asked for something else instead, see Experiment.run_instead)."""
    args = experiment.parse(argv)
    experiment.check_flags(args)
    if experiment.run_instead(args):
        return None
    cli.start_devices(args)
    spec = experiment.describe(args)
    cfg = build_config(experiment, args, spec)
    data = experiment.load(args)
    if data.spec != spec:  # e.g. the offline sample in place of MNIST: its own budget
        cfg = build_config(experiment, args, data.spec)
    cli.check_batch_size(cfg, data.n_train)
    mesh = cli.device_mesh(args, cfg)
    with output_folder(args, experiment.default_out) as out:
        training = _prepare(cfg, data, out, args, mesh, experiment.train_options(args, data))
        line = experiment.summary(training.run_cfg, data, training)
        if line:
            print(line)
        plan = announce(training)
        result = _train(training, args, experiment.on_eval(args, training))
        run = Run(args, cfg, data, out, plan, training, result)
        if sharding.is_writer():
            experiment.report(run)
    return run


def build_config(experiment: Experiment, args, spec: dict) -> SweepConfig:
    """The experiment's config; any ValueError or TypeError becomes a one-line usage error."""
    try:
        return experiment.config(args, spec)
    except (ValueError, TypeError) as e:
        raise cli.UsageError(str(e)) from None


@contextlib.contextmanager
def output_folder(args, default: str):
    """--out (or the --resume folder), prepared; if the run fails and the folder is empty
    (nothing written: no checkpoint to resume from), it is removed again when this run made it."""
    target = Path(args.out or default) if args.resume is None else args.resume
    existed = target.exists()
    out = cli.output_dir(args, default)
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out)  # only empty folders in it (the checkpoints' own, say)
        raise


def _prepare(cfg, data: Data, out: Path, args, mesh, options: dict) -> Training:
    try:
        return prepare(cfg, data.train, data.test, checkpoint=out / cli.CHECKPOINTS,
                       resume=args.resume is not None, run_info=data.info, mesh=mesh,
                       keep_checkpoints=args.keep_checkpoints,
                       host_limit=None if args.host_params_gb is None else int(args.host_params_gb * 1e9),
                       **options)
    except (CheckpointMismatch, ParamsFileError) as e:
        raise cli.UsageError(f"--resume {e}") from None


def _train(training: Training, args, on_eval=None) -> SweepResult:
    progress = not args.no_progress and sharding.is_writer()
    try:
        return training.run(progress, args.on_nan, on_eval)
    except Diverged as e:
        raise cli.RunFailed(f"{e}; try a smaller --lr, or --on-nan continue") from None


def save(run: Run, metrics: dict | None = None, extra: dict | None = None) -> Path:
    """params.pkl of the run's healthy models in its folder (or, for params too large for one
    host, their sharded form, said in one line); RunFailed if every model diverged."""
    try:
        path = run.result.save(run.out, metrics, extra)
    except AllDiverged as e:
        raise cli.RunFailed(f"{e}: no params.pkl written; try a smaller --lr") from None
    if not run.result.on_host and sharding.is_writer():
        print(f"the params do not fit one host: no params.pkl; written sharded to {path} and as "
              f"safetensors per process in {path.parent / 'params_shards'}")
    return path


def announce(training: Training, log=print) -> dict:
    """Prints the prepared run's budget and batching; returns them for metrics.json."""
    cfg, budget = training.cfg, training.budget
    log(f"budget: {budget.describe(cfg.batch_size, training.family.unit)}; evaluation every "
        f"{budget.eval_every} steps")
    log(f"batching: {training.batching} ({cfg.n_models} {cfg.model.arch} models on "
        f"{jax.default_backend()}{'' if cfg.batching == 'auto' else ', as asked'})")
    return {"steps": budget.steps, "epochs": budget.epochs, "steps_per_epoch": budget.steps_per_epoch,
            "eval_every": budget.eval_every, "batching": training.batching,
            "mesh": dict(training.mesh.shape) if training.mesh is not None else None,
            "processes": jax.process_count()}
