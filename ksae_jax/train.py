"""The training loop: `prepare` sets a sweep up (rows, input scale, budget, batching, state,
batches, the compiled step), `Training.run` feeds it batches, evaluates, checkpoints and
returns a `SweepResult`, which saves itself. `train_sweep` is both. Images and vectors, every
family, share it."""
from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from ksae_jax import batching, models, recipe, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.data.feed import ArrayRows, Rows, make_feeder
from ksae_jax.evaluate import EvalResult, EvalSet, evaluate
from ksae_jax.formats import config_diff, load_checkpoint, save_checkpoint, save_params
from ksae_jax.step import TrainState, init_state, k_at, resolved, state_layout, sweep_step

EVALS_PER_RUN = 10
PROBE_ROWS = 1024  # rows whose outputs are checked for NaN/Inf when no held-out set is given


class Budget(NamedTuple):
    steps: int            # optimizer steps of the whole run
    steps_per_epoch: int  # batches in one pass over the training rows (the last padded)
    eval_every: int       # steps between evaluations and checkpoints
    n_rows: int

    @property
    def epochs(self) -> float:
        return self.steps / self.steps_per_epoch

    def describe(self, batch_size: int, unit: str = "rows") -> str:
        return (f"{self.steps} steps = {self.epochs:.3g} epochs of {self.n_rows:,} {unit} "
                f"(batch {batch_size})")

    def segment_ends(self, start: int) -> list[int]:
        """Steps after which the run evaluates and checkpoints, from `start` on."""
        ends = list(range(self.eval_every, self.steps, self.eval_every)) + [self.steps]
        return [e for e in ends if e > start]


def make_budget(cfg: SweepConfig, n_rows: int) -> Budget:
    """cfg's steps, or epochs x batches per epoch; evaluations every epoch, or 10 per run
    when that would be more than 20 epochs or less than one (unless cfg.eval_every)."""
    per_epoch = -(-n_rows // cfg.batch_size)
    steps = cfg.steps or cfg.epochs * per_epoch
    every = cfg.eval_every
    if every is None:
        every = per_epoch if per_epoch <= steps <= 20 * per_epoch else -(-steps // EVALS_PER_RUN)
    return Budget(steps, per_epoch, min(every, steps), n_rows)


class Diverged(RuntimeError):
    """A model's loss or parameters became non-finite and on_nan="stop"."""


class AllDiverged(RuntimeError):
    """Every model of a sweep diverged: there is nothing to save."""


class CheckpointMismatch(ValueError):
    """A checkpoint was made with another configuration than the one resuming it."""


class SweepResult(NamedTuple):
    config: SweepConfig
    params: dict          # stacked numpy params, leading axis = model (one per k)
    history: dict         # per-model lists over the evaluations (None after a divergence)
    seconds: float        # wall time of training (compilation included; all sessions)
    compile_seconds: float
    diverged: dict        # label (k) -> {"step": s, "epoch": e} (1-based) of models that diverged
    budget: Budget
    final: EvalResult | None  # held-out metrics of the final params
    since_fired: np.ndarray   # (models, hidden) training rows since each unit last fired
    input_scale: float = 1.0  # what the inputs were multiplied by (normalize), 1 otherwise

    def healthy(self) -> tuple[SweepConfig, dict]:
        """(config, params) of the models that did not diverge; AllDiverged if none."""
        keep = [i for i, label in enumerate(self.config.labels) if label not in self.diverged]
        if not keep:
            raise AllDiverged("every model diverged (non-finite loss or parameters)")
        return self.config.select(keep), jax.tree.map(lambda a: a[np.asarray(keep)], self.params)

    def models(self, metrics: dict | None = None):
        """The healthy models for inference (ksae_jax.load's classes)."""
        cfg, params = self.healthy()
        return models.loaded(cfg, cfg.ks, params, metrics, self.input_scale)

    def save(self, folder, metrics: dict | None = None, extra: dict | None = None) -> Path:
        """folder/params.pkl with the healthy models, their config, the input scale and
        `metrics` (what ksae_jax.load reads back); only process 0 of a multi-host run writes."""
        cfg, params = self.healthy()
        path = Path(folder) / "params.pkl"
        if sharding.is_writer():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_params(path, config=cfg.to_dict(), ks=cfg.ks, params=params, metrics=metrics,
                        input_scale=self.input_scale, extra=extra)
        return path


def train_sweep(cfg: SweepConfig, train, test=None, *, progress: bool = True, checkpoint=None,
                resume: bool = False, on_nan: str = "stop", run_info: dict | None = None,
                feeder: str = "auto", mesh=None, init: dict | None = None,
                input_scale: float | None = None) -> SweepResult:
    """Trains every k of `cfg` side by side in one compiled program.

    train/test: uint8 images (N, 28, 28) for the image models; for vectors a float (N, d)
      array, a path, or a VectorSource (data.vectors). test (optional) is evaluated at every
      evaluation point. With cfg.model.normalize the inputs are scaled (result.input_scale).
    checkpoint: a file written (atomically) at every evaluation point; with resume=True
      training continues from it and ends with the same parameters as an uninterrupted run.
    on_nan: "stop" raises Diverged at the evaluation point after a model's loss, parameters
      or outputs became non-finite (the previous checkpoint is kept); "continue" freezes
      that model and trains the others on.
    run_info: extra settings (e.g. the data used) stored in the checkpoint and required to
      match on resume. feeder: "auto", "device" or "host" (see data.feed).
    mesh: a jax.sharding.Mesh with axes data/model/latent (see sharding), or None.
    init: stacked params to start from (e.g. an imported SAE's) instead of a fresh init, and
      input_scale the scale they were trained with (None: the one normalize computes).
    """
    return prepare(cfg, train, test, checkpoint=checkpoint, resume=resume, run_info=run_info,
                   feeder=feeder, mesh=mesh, init=init, input_scale=input_scale).run(progress, on_nan)


def prepare(cfg: SweepConfig, train, test=None, *, checkpoint=None, resume: bool = False,
            run_info: dict | None = None, feeder: str = "auto", mesh=None,
            init: dict | None = None, input_scale: float | None = None) -> "Training":
    """A sweep ready to train (see train_sweep for the arguments): its budget, batching,
    state, batches and compiled step, for the loop, the benchmarks and the experiments."""
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    with sharding.use(mesh):
        return Training(cfg, train, test, checkpoint, resume, run_info or {}, feeder, mesh, init,
                        input_scale)


class Training:
    """One prepared sweep. `run` trains it; `compile` gives the compiled step alone."""

    def __init__(self, cfg, train, test, checkpoint, resume, run_info, feeder, mesh, init=None,
                 input_scale=None):
        self.cfg, self.run_info, self.mesh, self.checkpoint = cfg, run_info, mesh, checkpoint
        self.family, self.clock = models.family(cfg.model), _Clock()
        rows = self.family.rows(train, "train")
        self.input_scale = self.family.input_scale(rows) if input_scale is None else input_scale
        rows = _scaled(rows, self.input_scale)
        replicated = functools.partial(sharding.put, spec=sharding.P(), mesh=mesh)
        self.evalset = None if test is None else EvalSet(
            _scaled(self.family.rows(test, "test"), self.input_scale), put=replicated)
        self.probe = self.evalset or EvalSet(_head(rows, PROBE_ROWS), put=replicated)
        self.budget, self.run_cfg = make_budget(cfg, rows.n), resolved(cfg, rows.n)
        self.batching = batching.resolve(cfg)
        if resume:
            ckpt = _restore(cfg, checkpoint, run_info)
            state, self.history, self.start = ckpt["state"], ckpt["history"], ckpt["step"]
            self.clock.before = ckpt["seconds"]
        else:
            state, self.history, self.start = init_state(cfg, rows, init), _fresh_history(), 0
        self.state = state_layout(sharding.put_state(state, mesh), self.batching)
        local = _process_rows(cfg.batch_size)
        self.feeder = make_feeder(rows, cfg.batch_size, cfg.seed, mode=feeder, local=local,
                                  put=sharding.batch_putter(mesh, local), put_order=replicated)
        self.batches = self.feeder.batches(self.start)

    @property
    def step_fn(self):
        """The jitted step of the sweep: (state, sums, batch, ks, step) -> (state, sums)."""
        return functools.partial(sweep_step, cfg=self.run_cfg)

    def ks_at(self, step: int) -> np.ndarray:
        return k_at(self.cfg, step, self.budget.steps)

    def compile(self, batch):
        """The step compiled for this sweep's state and batches (what the loop runs)."""
        with sharding.use(self.mesh):
            return sweep_step.lower(self.state, self.zero_sums(), batch, self.ks_at(0),
                                    np.int32(0), cfg=self.run_cfg).compile()

    def zero_sums(self) -> jax.Array:
        """Per-model (loss x rows, rec x rows, rows) accumulators for one segment."""
        with sharding.use(self.mesh):
            spec = sharding.leaf_spec((), 2)
        return sharding.put(np.zeros((self.cfg.n_models, 3), np.float32), spec, self.mesh)

    def run(self, progress: bool = True, on_nan: str = "stop") -> SweepResult:
        """Trains to the end of the budget (from the checkpoint when resuming)."""
        if on_nan not in ("stop", "continue"):
            raise ValueError(f"on_nan must be 'stop' or 'continue', got {on_nan!r}")
        with sharding.use(self.mesh):
            return self._loop(progress, on_nan)

    def _loop(self, progress: bool, on_nan: str) -> SweepResult:
        cfg, budget, history = self.cfg, self.budget, self.history
        bar = tqdm(total=budget.steps, initial=self.start, disable=not progress, unit="step",
                   desc=f"{cfg.n_models} models")
        final, start = None, self.start
        for end in budget.segment_ends(start):
            healthy_before = sharding.to_host(self.state.diverged_at) < 0
            state, sums = self._segment(start, end, bar)
            final = evaluate(self.run_cfg, state.params, self.probe)
            self.state = state = self._flag_nonfinite(state, final, end)
            diverged_at = sharding.to_host(state.diverged_at)
            if on_nan == "stop":
                _stop_if_diverged(cfg, diverged_at, healthy_before, budget,
                                  bool(self.checkpoint and history["step"]), bar)
            dead = recipe.dead_mask(self.host(state.since_fired), self.run_cfg.dead_tokens)
            _record(history, end, sharding.to_host(sums), final if self.evalset else None,
                    dead.mean(axis=1), diverged_at < 0)
            bar.set_postfix(_postfix(self.family, history))
            self._save_checkpoint(end, state)
            start = end
        bar.close()
        self.batches.close()
        return self._result(final)

    def _segment(self, start: int, end: int, bar):
        """Steps start..end-1 of the budget; sums of (loss, rec) x rows and rows, per model."""
        step_fn, state, sums = self.step_fn, self.state, self.zero_sums()
        for s in range(start, end):
            tc = time.perf_counter()
            state, sums = step_fn(state, sums, next(self.batches), self.ks_at(s), np.int32(s))
            if self.clock.compile_seconds == 0.0:
                jax.block_until_ready(sums)
                self.clock.compile_seconds = time.perf_counter() - tc
            bar.update()
        return state, sums

    def _save_checkpoint(self, step: int, state: TrainState) -> None:
        if self.checkpoint is None:
            return
        host = self.host(state)  # every process takes part in the gather
        if sharding.is_writer():
            save_checkpoint(self.checkpoint, config={**self.cfg.to_dict(), **self.run_info},
                            step=step, state=host, history=self.history,
                            seconds=self.clock.seconds())

    @staticmethod
    def host(tree):
        """numpy copies, stacked on the model axis whatever the layout."""
        return batching.stacked(sharding.to_host(tree))

    def _flag_nonfinite(self, state: TrainState, result: EvalResult, step: int) -> TrainState:
        """Marks as diverged (at the segment's last step) the healthy models whose outputs
        are not finite, though their parameters are (e.g. weights near float32's limit)."""
        diverged_at = sharding.to_host(state.diverged_at)
        bad = ~np.isfinite(result.mse) & (diverged_at < 0)
        if not bad.any():
            return state
        with sharding.use(self.mesh):
            spec = sharding.leaf_spec((), 1)
        return state._replace(diverged_at=sharding.put(np.where(bad, step - 1, diverged_at)
                                                       .astype(np.int32), spec, self.mesh))

    def _result(self, final) -> SweepResult:
        host = self.host(self.state)
        per_model = {k: [list(e) for e in zip(*v)] if k != "step" else list(v)
                     for k, v in self.history.items() if v}
        return SweepResult(self.cfg, host.params, per_model, self.clock.seconds(),
                           self.clock.compile_seconds,
                           _divergence(self.cfg, host.diverged_at, self.budget.steps_per_epoch),
                           self.budget, final if self.evalset else None, host.since_fired,
                           self.input_scale)


def _scaled(rows: Rows, scale: float) -> Rows:
    return rows if scale == 1.0 else rows.view(0, rows.n, scale)


def _restore(cfg: SweepConfig, path, run_info: dict) -> dict:
    ckpt = load_checkpoint(path)
    saved = dict(ckpt["config"])
    info = {k: saved.pop(k) for k in run_info if k in saved}
    try:  # the config as this version writes it (files of earlier versions included)
        saved = {**SweepConfig.from_dict(saved).to_dict(), **info}
    except (TypeError, ValueError, KeyError):
        saved = ckpt["config"]
    diff = config_diff(saved, {**cfg.to_dict(), **run_info})
    if diff:
        raise CheckpointMismatch(f"{path}: made with a different config: " + "; ".join(diff))
    like = jax.eval_shape(lambda: init_state(cfg))
    leaves, treedef = jax.tree.flatten(like)
    saved = ckpt["state"]
    if len(saved) != len(leaves) or any(np.shape(a) != s.shape for a, s in zip(saved, leaves)):
        raise CheckpointMismatch(f"{path}: its arrays do not match the configured models")
    ckpt["state"] = jax.tree.unflatten(treedef, [jax.numpy.asarray(a, s.dtype)
                                                 for a, s in zip(saved, leaves)])
    return ckpt


def _fresh_history() -> dict:
    return {name: [] for name in ("step", "train_loss", "train_rec", "eval_mse", "eval_fvu",
                                  "eval_l0", "eval_dead_frac", "window_dead_frac")}


def _record(history: dict, step: int, sums: np.ndarray, final: EvalResult | None,
            window_dead: np.ndarray, alive: np.ndarray) -> None:
    """Appends one evaluation point; None for the models that diverged."""
    def add(name, values):
        history[name].append([float(v) if a else None for v, a in zip(values, alive)])

    history["step"].append(step)
    n = np.maximum(sums[:, 2], 1)
    add("train_loss", sums[:, 0] / n)
    add("train_rec", sums[:, 1] / n)
    add("window_dead_frac", window_dead)
    if final is not None:
        for name in ("mse", "fvu", "l0", "dead_frac"):
            add(f"eval_{name}", getattr(final, name))


def _divergence(cfg: SweepConfig, diverged_at: np.ndarray, per_epoch: int) -> dict:
    return {k: {"step": int(g) + 1, "epoch": int(g) // per_epoch + 1}
            for k, g in zip(cfg.labels, diverged_at) if g >= 0}


def _process_rows(batch_size: int) -> tuple[int, int] | None:
    """This process's rows of every global batch when several processes share a run."""
    if jax.process_count() == 1:
        return None
    per = batch_size // jax.process_count()
    return jax.process_index() * per, (jax.process_index() + 1) * per


class _Clock:
    """Wall time of a run (earlier sessions of a resumed run included) and its compile time."""

    def __init__(self):
        self.t0, self.before, self.compile_seconds = time.perf_counter(), 0.0, 0.0

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self.t0


def _head(rows: Rows, n: int) -> Rows:
    return rows.view(0, min(n, rows.n)) if hasattr(rows, "view") else ArrayRows(
        rows.all()[:n], rows.scale)


def _stop_if_diverged(cfg, diverged_at: np.ndarray, healthy_before, budget: Budget, kept: bool,
                      bar) -> None:
    newly = healthy_before & (diverged_at >= 0)
    if not newly.any():
        return
    bar.close()
    where = _divergence(cfg, np.where(newly, diverged_at, -1), budget.steps_per_epoch)
    lines = ", ".join(f"{cfg.label_name}={k} at step {w['step']} (epoch {w['epoch']})"
                      for k, w in where.items())
    raise Diverged(f"non-finite loss or outputs: {lines}"
                   f"{'; the previous checkpoint is kept' if kept else ''}")


def _postfix(family, history: dict) -> dict:
    """Progress bar: the family's metrics, means over the healthy models."""
    def mean(name):
        v = [x for x in history[name][-1] if x is not None] if history[name] else []
        return sum(v) / len(v) if v else math.nan

    shown = {"loss": f"{mean('train_loss'):.4f}", "fvu": f"{mean('train_rec'):.4f}",
             "dead": f"{100 * mean('window_dead_frac'):.1f}%"}
    return {name: shown[name] for name in family.progress_names}
