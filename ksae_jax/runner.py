"""A training run from its configs to its files, the steps every command shares:
the devices (multi-host start, the mesh), the output folder (refused if it holds results,
removed again if the run fails before writing anything), `train.prepare`, the announcement of
the budget and batching, training with a progress bar, and params.pkl. Mistakes of the user
end in one line (flags.UsageError, exit code 2), a run that fails in another (RunFailed, 1)."""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal, NamedTuple

import jax

from ksae_jax import checks, sharding
from ksae_jax.checkpoint import FOLDER as CHECKPOINTS
from ksae_jax.checkpoint import KEEP
from ksae_jax.checkpoint import LEGACY as LEGACY_CHECKPOINT
from ksae_jax.config import Execution, Optimizer, SweepConfig
from ksae_jax.flags import Group, UsageError
from ksae_jax.safe_pickle import ParamsFileError
from ksae_jax.tracking import Tracking
from ksae_jax.train import AllDiverged, CheckpointMismatch, Diverged, SweepResult, Training, prepare


class RunFailed(Exception):
    """A run that could not produce its result (e.g. diverged): one line, exit code 1."""


@dataclasses.dataclass(frozen=True)
class Output:
    """Where a command writes, and whether it shows its progress."""

    out: Path | None = None
    """Output folder (None: the command's, e.g. runs/sae)."""
    overwrite: bool = False
    """Replace the results in a non-empty out."""
    progress: bool = True
    """Show a progress bar."""
    tracking: Tracking = Tracking()
    """Weights & Biases and TensorBoard logging (off by default)."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a training run resumes, feeds its batches, and what it does when a model diverges."""

    resume: Path | None = None
    """Continue the run in this folder from its last checkpoint (same flags as before)."""
    keep_checkpoints: int = KEEP
    """Keep the last N checkpoints."""
    host_params_gb: float | None = None
    """Params larger than this are saved sharded, not gathered into one params.pkl (None: a
    quarter of the host's memory)."""
    on_nan: Literal["stop", "continue"] = "stop"
    """When a model's loss becomes NaN/Inf: stop, or freeze that model and train the others on."""
    feeder: Literal["auto", "device", "host"] = "auto"
    """Batches from data held on the device, or read by a background thread (auto: by size)."""

    def __post_init__(self):
        checks.choice(self, "on_nan", "feeder")
        checks.positive_int("keep_checkpoints", self.keep_checkpoints)
        checks.positive("host_params_gb", self.host_params_gb, allow_none=True)


@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices a run uses, and the other processes of a multi-host run."""

    mesh: str | None = None
    """Device mesh, e.g. data=2,model=4 (axes data, model, latent; product = device count;
    None: every device on model when there are at least as many models, else on data)."""
    distributed: bool = False
    """One process of a multi-host run (jax.distributed.initialize)."""
    coordinator: str | None = None
    """distributed: process 0's address HOST:PORT (None: from the environment)."""
    num_processes: int | None = None
    """distributed: how many processes (None: from the environment)."""
    process_id: int | None = None
    """distributed: this process's index (None: from the environment)."""

    def __post_init__(self):
        if self.mesh is not None:
            sharding.parse_mesh(self.mesh)
        checks.positive_int("num_processes", self.num_processes, allow_none=True)

    def start(self) -> None:
        """First thing a multi-host run does: join the other processes."""
        if not self.distributed:
            return
        try:
            sharding.initialize(self.coordinator, self.num_processes, self.process_id)
        except (RuntimeError, ValueError) as e:
            raise UsageError(f"--distributed: {e}") from None

    def mesh_for(self, cfg: SweepConfig, log: Callable[[str], None] = print):
        """The mesh asked for (None on one device without one), checked and printed."""
        n = jax.device_count()
        if self.mesh is None and n == 1:
            return None
        try:
            axes = (sharding.parse_mesh(self.mesh) if self.mesh
                    else sharding.default_axes(n, cfg.n_models))
            sharding.check_axes(axes, n, cfg, cfg.family.shards_latents)
        except ValueError as e:
            raise UsageError(f"--mesh: {e}") from None
        hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
        log(f"mesh: {sharding.format_axes(axes)} over {n} {jax.devices()[0].platform} "
            f"devices{hosts}")
        return sharding.make_mesh(axes)


MULTI_HOST = frozenset({"distributed", "coordinator", "num_processes", "process_id"})


def training_groups(multi_host: bool = True) -> list[Group]:
    """The flags every training command shares, after its data, model and sweep: the
    optimizer, execution, output, the run, devices (and hosts, where the command runs on
    several)."""
    return [Group("optimizer and schedules", (Optimizer,)), Group("execution", (Execution,)),
            Group("output", (Output, Tracking)), Group("run", (RunOptions,)),
            Group("devices and hosts" if multi_host else "devices", (Devices,),
                  frozenset() if multi_host else MULTI_HOST)]


class Run(NamedTuple):
    """Everything a report may read about a finished run."""

    cfg: SweepConfig
    out: Path
    plan: dict          # the announced budget, batching and mesh (for metrics.json)
    training: Training
    result: SweepResult


def check_batch_size(cfg: SweepConfig, n_train: int) -> None:
    if cfg.batch_size > n_train:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the training set "
                         f"({n_train} rows)")


def train(cfg: SweepConfig, rows, held, output: Output, options: RunOptions, devices: Devices,
          *, default_out: str, run_info: dict, summary: Callable[[Training], str] | None = None,
          on_eval=None, **prepare_kw) -> Run:
    """The run: mesh, output folder, prepare (resuming when asked), announce, train."""
    try:
        cfg.model.check_runnable()
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_batch_size(cfg, rows.n if hasattr(rows, "n") else len(rows))
    mesh = devices.mesh_for(cfg)
    with output_folder(output, options.resume, default_out) as out:
        had_checkpoints = (out / CHECKPOINTS).exists()
        try:
            training = prepare(
                cfg, rows, held, checkpoint=out / CHECKPOINTS, resume=options.resume is not None,
                run_info=run_info, mesh=mesh, keep_checkpoints=options.keep_checkpoints,
                feeder=options.feeder, host_limit=None if options.host_params_gb is None
                else int(options.host_params_gb * 1e9), **prepare_kw)
        except (CheckpointMismatch, ParamsFileError) as e:
            if not had_checkpoints and (out / CHECKPOINTS).is_dir():
                shutil.rmtree(out / CHECKPOINTS)  # made by this run's checkpointer, empty
            raise UsageError(f"--resume {e}") from None
        if summary is not None:
            print(summary(training))
        plan = announce(training)
        tracker = output.tracking.open(out, {**cfg.to_dict(), **run_info}) \
            if sharding.is_writer() else None
        try:
            result = training.run(output.progress and sharding.is_writer(), options.on_nan,
                                  _each_evaluation(training, tracker, on_eval))
        except Diverged as e:
            raise RunFailed(f"{e}; try a smaller --lr, or --on-nan continue") from None
        finally:
            if tracker is not None:
                tracker.close()
    return Run(cfg, out, plan, training, result)


def _each_evaluation(training: Training, tracker, on_eval):
    """What runs at every evaluation point: the tracker's log and the command's own."""
    own = on_eval(training) if on_eval else None
    if tracker is None:
        return own
    names = list(training.cfg.model_names)

    def each(step, params):
        tracker.log(step, training.history, names)
        if own is not None:
            own(step, params)

    return each


@contextlib.contextmanager
def output_folder(output: Output, resume: Path | None, default: str):
    """out (or the resume folder), prepared; if the run fails and the folder is empty
    (nothing written: no checkpoint to resume from), it is removed again when this run made it."""
    target = Path(output.out or default) if resume is None else Path(resume)
    existed = target.exists()
    out = output_dir(output, resume, default)
    try:
        yield out
    except BaseException:
        if not existed and out.is_dir() and not any(p.is_file() for p in out.rglob("*")):
            shutil.rmtree(out)  # only empty folders in it (the checkpoints' own, say)
        raise


def output_dir(output: Output, resume: Path | None, default: str) -> Path:
    """out (prepared, refused if non-empty without overwrite), or the resume folder."""
    if resume is None:
        return prepare_out_dir(Path(output.out or default), output.overwrite)
    folder = Path(resume)
    if output.out is not None and Path(output.out).resolve() != folder.resolve():
        raise UsageError(f"--resume {folder} continues in that folder; drop --out {output.out}")
    if not (folder / CHECKPOINTS).is_dir() and not (folder / LEGACY_CHECKPOINT).is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINTS}/ there (nothing to resume)")
    for stale in folder.glob(".*.tmp"):  # partial writes of the interrupted run
        stale.unlink()
    return folder


def prepare_out_dir(path: Path, overwrite: bool) -> Path:
    """Creates an output folder, refusing a non-empty one without overwrite and an unwritable one."""
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


def announce(training: Training, log=print) -> dict:
    """Prints the prepared run's budget and batching; returns them for metrics.json."""
    cfg, budget = training.cfg, training.budget
    log(f"budget: {budget.describe(cfg.batch_size, training.family.unit)}; evaluation every "
        f"{budget.eval_every} steps")
    asked = "" if cfg.execution.batching == "auto" else ", as asked"
    log(f"batching: {training.batching} ({cfg.n_models} {cfg.model.arch} models on "
        f"{jax.default_backend()}{asked})")
    return {"steps": budget.steps, "epochs": budget.epochs, "steps_per_epoch": budget.steps_per_epoch,
            "eval_every": budget.eval_every, "batching": training.batching,
            "mesh": dict(training.mesh.shape) if training.mesh is not None else None,
            "processes": jax.process_count()}


def save(run: Run, metrics: dict | None = None, extra: dict | None = None) -> Path:
    """params.pkl of the run's healthy models in its folder (or, for params too large for one
    host, their sharded form, said in one line); RunFailed if every model diverged."""
    try:
        path = run.result.save(run.out, metrics, extra)
    except AllDiverged as e:
        raise RunFailed(f"{e}: no params.pkl written; try a smaller --lr") from None
    if not run.result.on_host and sharding.is_writer():
        print(f"the params do not fit one host: no params.pkl; written sharded to {path} and as "
              f"safetensors per process in {path.parent / 'params_shards'}")
    return path
