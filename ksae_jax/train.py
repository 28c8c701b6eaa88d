"""The training loop: `prepare` sets a sweep up (rows, input scale, budget, batching, state,
batches, the compiled step), `Training.run` feeds it batches, evaluates, checkpoints and
returns a `SweepResult`, which saves itself. `train_sweep` is both. Images and vectors, every
family, share it."""
from __future__ import annotations

import functools
import math
import os
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ksae_jax import batching, models, recipe, sharding
from ksae_jax.checkpoint import KEEP, Checkpoints, read_legacy, save_sharded_params
from ksae_jax.checkpoint import LEGACY as LEGACY_CHECKPOINT
from ksae_jax.config import SweepConfig
from ksae_jax.data.feed import ArrayRows, Rows, make_feeder
from ksae_jax.evaluate import EvalResult, EvalSet, evaluate_each
from ksae_jax.files import strict_json
from ksae_jax.formats import config_diff, read_config, save_params
from ksae_jax.step import (
    TrainState,
    init_state,
    k_at,
    resolved,
    state_layout,
    sweep_step,
)

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
    every = cfg.execution.eval_every
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
    params: dict          # stacked params, leading axis = model (one per k): numpy, or sharded
                          # jax arrays when they do not fit one host (see on_host)
    history: dict         # per-model lists over the evaluations (None after a divergence)
    seconds: float        # wall time of training (compilation and every part of a resumed run)
    compile_seconds: float
    diverged: dict        # label (k) -> {"step": s, "epoch": e} (1-based) of models that diverged
    budget: Budget
    final: EvalResult | None  # held-out metrics of the final params
    since_fired: np.ndarray   # (models, latents) training rows since each unit last fired
    input_scale: float = 1.0  # what the inputs were multiplied by (normalize), 1 otherwise

    @property
    def on_host(self) -> bool:
        """Whether the params were gathered into this process (they fit one host)."""
        return all(isinstance(a, np.ndarray) for a in jax.tree.leaves(self.params))

    def for_hookpoint(self, h: int) -> SweepResult:
        """The result of hookpoint h's sweep alone (of a run with hookpoints)."""
        cfg, n = self.config, len(self.config.labels)
        part = slice(h * n, (h + 1) * n)
        prefix = f"{cfg.hookpoints[h]}/"
        pick = lambda tree: jax.tree.map(lambda a: a[part], tree)  # noqa: E731
        final = None if self.final is None else self.final._replace(
            **{f: getattr(self.final, f)[part] for f in ("mse", "fvu", "l0", "dead_frac", "counts")},
            extra=pick(self.final.extra))
        history = {k: v if k == "step" else v[part] for k, v in self.history.items()}
        diverged = {k[len(prefix):]: v for k, v in self.diverged.items() if k.startswith(prefix)}
        return self._replace(config=cfg.one_sweep, params=pick(self.params), history=history,
                             diverged={label: diverged[str(label)] for label in cfg.labels
                                       if str(label) in diverged},
                             final=final, since_fired=self.since_fired[part])

    def healthy(self) -> tuple[SweepConfig, dict]:
        """(config, params) of the models that did not diverge; AllDiverged if none."""
        keep = [i for i, label in enumerate(self.config.labels) if label not in self.diverged]
        if not keep:
            raise AllDiverged("every model diverged (non-finite loss or parameters)")
        return self.config.select(keep), jax.tree.map(lambda a: a[np.asarray(keep)], self.params)

    def models(self, metrics: dict | None = None):
        """The healthy models for inference (ksae_jax.load's classes)."""
        cfg, params = self.healthy()
        return models.loaded(cfg, params, metrics, self.input_scale)

    def save(self, folder, metrics: dict | None = None, extra: dict | None = None) -> Path:
        """folder/params.pkl with the healthy models, their config, the input scale and
        `metrics` (what ksae_jax.load reads back); only process 0 of a multi-host run writes.
        Params that do not fit one host are written sharded instead (save_sharded_params:
        every process its own shards, no params.pkl); returns that folder then."""
        if not self.on_host:
            meta = {"config": strict_json(self.config.to_dict()), "input_scale": self.input_scale,
                    "metrics": strict_json(metrics or {}), "diverged": strict_json(
                        {str(k): v for k, v in self.diverged.items()})}
            return save_sharded_params(Path(folder), self.params, meta)
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
      Or train is a live source (lm.live.LiveStream: batches of one set of rows per
      hookpoint of cfg.hookpoints) and test a list of held-out sets, one per hookpoint.
    checkpoint: a folder of Orbax checkpoints written (asynchronously, atomically, each
      process its own shards) at every evaluation point; with resume=True training continues
      from the latest (or from a ksae_jax 0.2 checkpoint.pkl beside the folder) and ends with
      the same parameters as an uninterrupted run.
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
            init: dict | None = None, input_scale: float | None = None,
            keep_checkpoints: int = KEEP, host_limit: int | None = None) -> Training:
    """A sweep ready to train (see train_sweep for the arguments): its budget, batching,
    state, batches and compiled step, for the loop, the benchmarks and the experiments.
    keep_checkpoints: how many checkpoints stay; host_limit: the bytes of params that are
    still gathered into one process at the end (default: a quarter of the host's memory)."""
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    with sharding.use(mesh):
        return Training(cfg, train, test, checkpoint, resume, run_info or {}, feeder, mesh, init,
                        input_scale, keep_checkpoints, host_limit)


class Training:
    """One prepared sweep. `run` trains it; `compile` gives the compiled step alone."""

    def __init__(self, cfg, train, test, checkpoint, resume, run_info, feeder, mesh, init=None,
                 input_scale=None, keep_checkpoints=KEEP, host_limit=None):
        self.cfg, self.run_info, self.mesh, self.checkpoint = cfg, run_info, mesh, checkpoint
        self.host_limit = host_limit
        self.checkpoints = None if checkpoint is None else Checkpoints(checkpoint, keep_checkpoints)
        self.family, self.clock = cfg.family, _Clock()
        self.stream = train if hasattr(train, "batches") else None  # a live source
        if self.stream is None:
            rows = self._rows(train, test, input_scale, mesh)
        else:
            rows, self.input_scale = None, 1.0
            self.evalsets = [r if isinstance(r, EvalSet) else EvalSet(r) for r in test]
            self.probe = self.evalsets
        n = rows.n if rows is not None else self.stream.n
        self.budget, self.run_cfg = make_budget(cfg, n), resolved(cfg, n)
        self.batching = batching.resolve(cfg)
        if resume:
            state, meta = self._resume()
            self.history, self.start = meta["history"], meta["step"]
            self.clock.before = meta["seconds"]
        else:
            state, self.history, self.start = self._fresh(rows, init, mesh), _fresh_history(), 0
        self.state = state_layout(state, self.batching)
        if self.stream is None:
            local = _process_rows(cfg.batch_size)
            self.feeder = make_feeder(rows, cfg.batch_size, cfg.seed, mode=feeder, local=local,
                                      put=sharding.batch_putter(mesh, local),
                                      put_order=self._replicated)
        else:
            self.feeder = self.stream
        self.batches = self.feeder.batches(self.start)

    def _rows(self, train, test, input_scale, mesh) -> Rows:
        """The training rows (scaled), and the held-out set and the probe set up from them."""
        rows = self.family.rows(train, "train")
        self.input_scale = self.family.input_scale(rows) if input_scale is None else input_scale
        rows = _scaled(rows, self.input_scale)
        self._replicated = replicated = functools.partial(sharding.put, spec=sharding.P(),
                                                          mesh=mesh)
        self.evalsets = None if test is None else [EvalSet(
            _scaled(self.family.rows(test, "test"), self.input_scale), put=replicated)]
        self.probe = self.evalsets or [EvalSet(_head(rows, PROBE_ROWS), put=replicated)]
        return rows

    def _fresh(self, rows, init, mesh) -> TrainState:
        """Fresh models; with hookpoints, each hookpoint's initialised from its own rows."""
        if self.stream is None:
            return init_state(self.cfg, rows, init, mesh)
        parts = [init_state(self.cfg.one_sweep, self.stream.init_rows(h), init)
                 for h in range(self.cfg.n_sources)]
        return jax.tree.map(lambda *a: jnp.concatenate(a), *parts)

    def abstract_state(self):
        """The train state's shapes, dtypes and placements (what a restore fills in)."""
        like = jax.eval_shape(lambda: init_state(self.cfg))
        placed = sharding.state_shardings(like, self.mesh)
        return jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p),
                            like, placed)

    def _resume(self):
        """(state, meta) of the latest checkpoint, or of an earlier version's checkpoint.pkl
        beside the folder; refused, before any array is read, when its config is another."""
        like = self.abstract_state()
        legacy = self.checkpoint.parent / LEGACY_CHECKPOINT
        if self.checkpoints.latest() is not None:
            self._check_config(self.checkpoints.meta())
            if self.stream is None:
                return self.checkpoints.restore(like)
            state, meta, stream = self.checkpoints.restore(
                like, stream_like=self.stream.abstract())
            self.stream.restore(stream)
            return state, meta
        if legacy.is_file():
            state, meta = read_legacy(legacy, like)
            self._check_config(meta)
            return state, meta
        raise CheckpointMismatch(f"{self.checkpoint}: no complete checkpoint to resume from")

    def _check_config(self, meta: dict) -> None:
        diff = config_diff(_current_form(meta["config"], self.run_info),
                           {**self.cfg.to_dict(), **self.run_info})
        if diff:
            raise CheckpointMismatch(f"{self.checkpoint}: made with a different config: "
                                     + "; ".join(diff))

    @property
    def step_fn(self):
        """The jitted step of the sweep: (state, sums, batch, ks, step) -> (state, sums)."""
        return functools.partial(sweep_step, cfg=self.run_cfg, objective=self.objective)

    @property
    def objective(self):
        """An end-to-end loss of a live source (lm.e2e), or None."""
        return getattr(self.stream, "objective", None)

    def ks_at(self, step: int) -> np.ndarray | None:
        return k_at(self.cfg, step, self.budget.steps)

    def compile(self, batch):
        """The step compiled for this sweep's state and batches (what the loop runs)."""
        with sharding.use(self.mesh):
            return sweep_step.lower(self.state, self.zero_sums(), batch, self.ks_at(0),
                                    np.int32(0), cfg=self.run_cfg,
                                    objective=self.objective).compile()

    def zero_sums(self) -> jax.Array:
        """Per-model (loss x rows, rec x rows, rows) accumulators for one segment."""
        with sharding.use(self.mesh):
            spec = sharding.leaf_spec((), 2)
        return sharding.put(np.zeros((self.cfg.n_models, 3), np.float32), spec, self.mesh)

    def run(self, progress: bool = True, on_nan: str = "stop", on_eval=None) -> SweepResult:
        """Trains to the end of the budget (from the checkpoint when resuming); on_eval(step,
        params) is called at every evaluation point (e.g. to keep snapshots)."""
        if on_nan not in ("stop", "continue"):
            raise ValueError(f"on_nan must be 'stop' or 'continue', got {on_nan!r}")
        with sharding.use(self.mesh):
            try:
                return self._loop(progress, on_nan, on_eval)
            finally:  # a run that stops (diverged, interrupted) leaves its last save complete
                if self.checkpoints is not None:
                    self.checkpoints.wait()

    def _loop(self, progress: bool, on_nan: str, on_eval) -> SweepResult:
        cfg, budget, history = self.cfg, self.budget, self.history
        live = self.stream is not None  # counted in tokens, with the LM's share of the time
        bar = tqdm(total=budget.steps, initial=self.start, disable=not progress,
                   unit="tok" if live else "step", unit_scale=cfg.batch_size if live else False,
                   desc=f"{cfg.n_models} models")
        final, start = None, self.start
        for end in budget.segment_ends(start):
            healthy_before = sharding.to_host(self.state.diverged_at) < 0
            state, sums = self._segment(start, end, bar)
            final = evaluate_each(self.run_cfg, state.params, self.probe)
            self.state = state = self._flag_nonfinite(state, final, end)
            diverged_at = sharding.to_host(state.diverged_at)
            if on_nan == "stop":
                _stop_if_diverged(cfg, diverged_at, healthy_before, budget,
                                  bool(self.checkpoint and history["step"]), bar)
            _record(history, end, sharding.to_host(sums), final if self.evalsets else None,
                    self._window_dead(state), diverged_at < 0)
            bar.set_postfix({**_postfix(self.family, history),
                             **({"lm": f"{self.stream.lm.seconds / self.clock.seconds():.0%}"}
                                if live else {})})
            if on_eval is not None:  # before the checkpoint: a resumed run has what it wrote
                on_eval(end, batching.stacked(state.params))
            self._save_checkpoint(end, state)
            start = end
        bar.close()
        self.batches.close()
        return self._result(final)

    def _window_dead(self, state: TrainState) -> np.ndarray:
        """Per model, the fraction of latents dead by the training window (on the devices:
        the counters are never gathered)."""
        frac = jax.tree.map(lambda c: jnp.mean(recipe.dead_mask(c, self.run_cfg.model.dead_tokens),
                                               axis=-1), state.since_fired)
        return np.asarray(sharding.to_host(batching.stacked(frac)))

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
        """Every process starts writing its own shards (Orbax); training goes on meanwhile."""
        if self.checkpoints is None:
            return
        meta = {"config": strict_json({**self.cfg.to_dict(), **self.run_info}), "step": step,
                "history": strict_json(self.history), "seconds": self.clock.seconds()}
        self.checkpoints.save(step, batching.stacked(state), meta,
                              stream=None if self.stream is None else self.stream.saved())

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
        """The result; params and counters gathered to this process when they fit one host
        (host_limit bytes), left sharded on the devices otherwise."""
        stacked = batching.stacked(self.state)
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(stacked.params))
        fits = nbytes <= (self.host_limit if self.host_limit is not None else host_memory() / 4)
        params, since_fired = (sharding.to_host((stacked.params, stacked.since_fired)) if fits
                               else (stacked.params, stacked.since_fired))
        per_model = {k: [list(e) for e in zip(*v)] if k != "step" else list(v)
                     for k, v in self.history.items() if v}
        diverged_at = sharding.to_host(stacked.diverged_at)
        return SweepResult(self.cfg, params, per_model, self.clock.seconds(),
                           self.clock.compile_seconds,
                           _divergence(self.cfg, diverged_at, self.budget.steps_per_epoch),
                           self.budget, final if self.evalsets else None, since_fired,
                           self.input_scale)


def host_memory() -> int:
    """Bytes of physical memory of this host."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _scaled(rows: Rows, scale: float) -> Rows:
    return rows if scale == 1.0 else rows.view(0, rows.n, scale)


def _current_form(saved: dict, run_info: dict) -> dict:
    """A checkpoint's config as this version writes it (files of earlier versions included)."""
    saved = dict(saved)
    info = {k: saved.pop(k) for k in run_info if k in saved}
    try:
        return {**read_config(saved).to_dict(), **info}
    except (TypeError, ValueError, KeyError):
        return {**saved, **info}


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
    names = cfg.model_names if cfg.hookpoints else cfg.labels
    return {k: {"step": int(g) + 1, "epoch": int(g) // per_epoch + 1}
            for k, g in zip(names, diverged_at) if g >= 0}


def _process_rows(batch_size: int) -> tuple[int, int] | None:
    """This process's rows of every global batch when several processes share a run."""
    if jax.process_count() == 1:
        return None
    per = batch_size // jax.process_count()
    return jax.process_index() * per, (jax.process_index() + 1) * per


class _Clock:
    """Wall time of a run (the parts before a resume included) and its compile time."""

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
