"""Training: a pure optax step for one model, one compiled step for every model of a sweep,
and the loop that feeds it batches, evaluates, and checkpoints. Images and vectors share it."""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ksae_jax import batching, models, optim, recipe, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.data.feed import ArrayRows, Rows, make_feeder
from ksae_jax.evaluate import EvalResult, EvalSet, evaluate
from ksae_jax.losses import loss_fn

MAX_DEAD_TOKENS = 10_000_000
MEDIAN_ROWS = 32_768
EVALS_PER_RUN = 10


class TrainState(NamedTuple):
    """Everything a sweep carries from step to step (leading axis = model)."""

    params: dict
    opt_state: tuple
    since_fired: jax.Array  # (models, hidden) int32: training rows since each unit fired
    diverged_at: jax.Array  # (models,) int32: global step at which a model diverged, or -1


# ---------------------------------------------------------------- one model, one step

def train_step(params, opt_state, since_fired, k, lr, l1, alive, batch, step, *,
               cfg: SweepConfig, max_k: int):
    """One Adam step of one model on one batch {"x", "w"} (w = 0: padding).

    The parameters are left unchanged when `alive` is False or the loss or a gradient is
    not finite (metrics["finite"]); the optimizer state of such a step is not used again.
    (An update that overflows from finite gradients shows in the model's outputs, which the
    training loop checks at every evaluation point.)
    """
    dead = recipe.dead_mask(since_fired, cfg.dead_tokens)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn(cfg), cfg=cfg, max_k=max_k),
                                 has_aux=True)
    (loss, metrics), grads = grad_fn(params, batch, k, l1, dead)
    topk = cfg.model.arch == "topk"
    if topk:
        grads["W_dec"] = recipe.remove_parallel_component(params["W_dec"], grads["W_dec"])
    finite = jnp.isfinite(loss) & _all_finite(grads)
    direction, opt_state = optim.make_optimizer(cfg).update(grads, opt_state)
    # the update is masked, not the result selected: every buffer stays updated in place
    # (selecting between old and new states forced fresh buffers: MLP step 20 -> 35 ms)
    keep = finite & alive
    rate = optim.learning_rate(lr, step, cfg.warmup_steps)
    new = jax.tree.map(lambda p, u: p - jnp.where(keep, rate * u, 0.0), params, direction)
    if topk:  # unit rows again; a frozen model's rows are left bit for bit
        new["W_dec"] = jnp.where(keep, recipe.unit_norm_rows(new["W_dec"]), params["W_dec"])
    since_fired = recipe.update_dead_counters(since_fired, metrics["fired"], batch["w"].sum())
    return new, opt_state, since_fired, {"loss": loss, "rec": metrics["rec"], "finite": finite}


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state", "sums"))
def sweep_step(state: TrainState, sums: jax.Array, batch: dict, ks, step, *, cfg: SweepConfig):
    """One step of every model of the sweep on one batch.

    ks: each model's k at this step (the k schedule; traced). A model whose loss or gradients
    are not finite keeps its last finite parameters from then on; diverged_at records the
    step. sums accumulates per-model (loss, rec) x real rows, and the real rows.
    """
    batch = sharding.constrain(batch, {k: sharding.batch_spec(v.ndim) for k, v in batch.items()})
    alive = state.diverged_at < 0
    per_model = (state.params, state.opt_state, state.since_fired, ks,
                 jnp.asarray(cfg.lrs, jnp.float32), jnp.full(len(cfg.ks), cfg.l1, jnp.float32),
                 alive)
    params, opt_state, since_fired, m = batching.over_models(
        functools.partial(train_step, cfg=cfg), cfg, batching.resolve(cfg), per_model,
        (batch, step))
    m = batching.stacked(m)
    diverged_at = jnp.where(alive & ~m["finite"], step, state.diverged_at)
    n = batch["w"].sum()
    new = jnp.stack([m["loss"] * n, m["rec"] * n, jnp.full_like(m["loss"], n)], axis=-1)
    sums = sums + jnp.where((alive & m["finite"])[:, None], new, 0.0)
    state = TrainState(params, opt_state, since_fired, diverged_at)
    return sharding.constrain(state, sharding.state_specs(state)), sums


# ---------------------------------------------------------------- budget and schedule

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


def k_at(cfg: SweepConfig, step: int, total_steps: int) -> np.ndarray:
    """Per-model k at a step: the schedule's k (from k_start towards each k over the first
    k_anneal_frac of the budget), or the target k."""
    ks = np.asarray(cfg.ks)
    frac = step / total_steps
    if cfg.k_start is None or frac >= cfg.k_anneal_frac:
        return ks.astype(np.int32)
    moved = cfg.k_start + frac / cfg.k_anneal_frac * (ks - cfg.k_start)
    return np.maximum(ks, np.round(moved)).astype(np.int32)


# ---------------------------------------------------------------- the loop

class SweepResult(NamedTuple):
    params: dict          # stacked numpy params, leading axis = model (one per k)
    history: dict         # per-model lists over the evaluations (None after a divergence)
    seconds: float        # wall time of training (compilation included; all sessions)
    compile_seconds: float
    diverged: dict        # k -> {"step": s, "epoch": e} (1-based) of models that diverged
    budget: Budget
    final: EvalResult | None  # held-out metrics of the final params
    since_fired: np.ndarray   # (models, hidden) training rows since each unit last fired


class Diverged(RuntimeError):
    """A model's loss or parameters became non-finite and on_nan="stop"."""


class CheckpointMismatch(ValueError):
    """A checkpoint was made with another configuration than the one resuming it."""


def check_images(images, name: str) -> np.ndarray:
    """uint8 (N, 28, 28), as the image models train on them."""
    a = np.asarray(images)
    if a.ndim != 3 or a.shape[1:] != (28, 28) or a.dtype != np.uint8 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty uint8 array of shape (N, 28, 28), got "
                         f"{a.dtype} {a.shape}")
    return a


def as_rows(cfg: SweepConfig, data, name: str) -> Rows:
    """Training or held-out data as Rows: uint8 images (scaled by 1/255) for the image
    models; a VectorSource or a float (N, d) array for topk."""
    if cfg.model.is_image:
        return data if isinstance(data, ArrayRows) else ArrayRows(check_images(data, name), 1 / 255)
    from ksae_jax.data.vectors import VectorSource, open_vectors
    if not isinstance(data, VectorSource):
        data = open_vectors(data)
    if data.row_shape != cfg.model.input_shape:
        raise ValueError(f"{name} has rows of shape {data.row_shape}; the model takes "
                         f"{cfg.model.input_shape}")
    return data


def resolved(cfg: SweepConfig, n_rows: int) -> SweepConfig:
    """cfg with the data-dependent defaults filled in (dead_tokens)."""
    return dataclasses.replace(cfg, dead_tokens=cfg.dead_tokens or min(MAX_DEAD_TOKENS, n_rows))


def init_state(cfg: SweepConfig, rows: Rows | None = None) -> TrainState:
    """Fresh models, one per k (init seeds cfg.seeds); topk: b_dec = the geometric median of
    up to 32,768 training rows drawn with cfg.seed."""
    keys = jax.vmap(jax.random.key)(jnp.asarray(cfg.seeds, jnp.uint32))
    params = jax.vmap(functools.partial(models.init_params, cfg.model))(keys)
    params = jax.tree.map(jnp.copy, params)  # own buffers: init may alias equal leaves (W_enc = W_dec)
    if cfg.model.arch == "topk" and rows is not None:
        pick = np.random.default_rng(cfg.seed).permutation(rows.n)[:MEDIAN_ROWS]
        median = recipe.geometric_median(rows.take(np.sort(pick)) * np.float32(rows.scale))
        params["b_dec"] = jnp.broadcast_to(median, params["b_dec"].shape)
    opt_state = jax.vmap(optim.make_optimizer(cfg).init)(params)
    n = len(cfg.ks)
    return TrainState(params, opt_state, jnp.zeros((n, cfg.model.hidden), jnp.int32),
                      jnp.full(n, -1, jnp.int32))


def state_layout(state: TrainState, how: str) -> TrainState:
    """The state as a batching works on it: per-model params, Adam states and counters for
    "loop" (batching.Models), stacked for "vmap"; divergence steps stay stacked."""
    n = len(state.diverged_at)
    return state._replace(**{f: batching.layout(getattr(state, f), how, n)
                             for f in ("params", "opt_state", "since_fired")})


def _restore(cfg: SweepConfig, path, run_info: dict) -> dict:
    from ksae_jax.checkpoint import config_diff, load_checkpoint

    ckpt = load_checkpoint(path)
    diff = config_diff(ckpt["config"], {**cfg.to_dict(), **run_info})
    if diff:
        raise CheckpointMismatch(f"{path}: made with a different config: " + "; ".join(diff))
    like = jax.eval_shape(lambda: init_state(cfg))
    leaves, treedef = jax.tree.flatten(like)
    saved = ckpt["state"]
    if len(saved) != len(leaves) or any(np.shape(a) != s.shape for a, s in zip(saved, leaves)):
        raise CheckpointMismatch(f"{path}: its arrays do not match the configured models")
    ckpt["state"] = jax.tree.unflatten(treedef, [jnp.asarray(a, s.dtype)
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
            for k, g in zip(cfg.ks, diverged_at) if g >= 0}


def train_sweep(cfg: SweepConfig, train, test=None, *, progress: bool = True, checkpoint=None,
                resume: bool = False, on_nan: str = "stop", run_info: dict | None = None,
                feeder: str = "auto", mesh=None) -> SweepResult:
    """Trains every k of `cfg` side by side in one compiled program.

    train/test: uint8 images (N, 28, 28) for conv/mlp; for topk a float (N, d) array, a
      path, or a VectorSource (data.vectors). test (optional) is evaluated at every
      evaluation point.
    checkpoint: a file written (atomically) at every evaluation point; with resume=True
      training continues from it and ends with the same parameters as an uninterrupted run.
    on_nan: "stop" raises Diverged at the evaluation point after a model's loss, parameters
      or outputs became non-finite (the previous checkpoint is kept); "continue" freezes
      that model and trains the others on.
    run_info: extra settings (e.g. the data used) stored in the checkpoint and required to
      match on resume. feeder: "auto", "device" or "host" (see data.feed).
    mesh: a jax.sharding.Mesh with axes data/model/latent (see sharding), or None.
    """
    if on_nan not in ("stop", "continue"):
        raise ValueError(f"on_nan must be 'stop' or 'continue', got {on_nan!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    with sharding.use(mesh):
        run = _Run(cfg, train, test, checkpoint if resume else None, run_info or {}, feeder, mesh)
        return run.loop(progress, checkpoint, on_nan)


PROBE_ROWS = 1024  # rows whose outputs are checked for NaN/Inf when no held-out set is given


class _Run:
    """One call of train_sweep: data, placement, budget, state; `loop` trains."""

    def __init__(self, cfg, train, test, resume_from, run_info, feeder, mesh):
        self.cfg, self.run_info, self.clock = cfg, run_info, _Clock()
        rows = as_rows(cfg, train, "train")
        replicated = functools.partial(sharding.put, spec=sharding.P(), mesh=mesh)
        self.evalset = None if test is None else EvalSet(as_rows(cfg, test, "test"), put=replicated)
        self.probe = self.evalset or EvalSet(_head(rows, PROBE_ROWS), put=replicated)
        self.budget, self.run_cfg = make_budget(cfg, rows.n), resolved(cfg, rows.n)
        if resume_from is not None:
            ckpt = _restore(cfg, resume_from, run_info)
            state, self.history, self.start = ckpt["state"], ckpt["history"], ckpt["step"]
            self.clock.before = ckpt["seconds"]
        else:
            state, self.history, self.start = init_state(cfg, rows), _fresh_history(), 0
        self.mesh = mesh
        self.state = state_layout(sharding.put_state(state, mesh), batching.resolve(cfg))
        local = _process_rows(cfg.batch_size)
        self.batches = make_feeder(rows, cfg.batch_size, cfg.seed, mode=feeder, local=local,
                                   put=sharding.batch_putter(mesh, local),
                                   put_order=replicated).batches(self.start)

    def loop(self, progress: bool, checkpoint, on_nan: str) -> SweepResult:
        from ksae_jax.checkpoint import save_checkpoint

        cfg, budget, history = self.cfg, self.budget, self.history
        step_fn = functools.partial(sweep_step, cfg=self.run_cfg)
        bar = tqdm(total=budget.steps, initial=self.start, disable=not progress, unit="step",
                   desc=f"{len(cfg.ks)} models")
        final, start = None, self.start
        for end in budget.segment_ends(start):
            healthy_before = sharding.to_host(self.state.diverged_at) < 0
            state, sums = _train_segment(step_fn, self.state, self.batches, cfg, budget, start,
                                         end, self.clock, bar, self.zero_sums())
            final = evaluate(self.run_cfg, state.params, self.probe)
            self.state = state = self._flag_nonfinite(state, final, end)
            diverged_at = sharding.to_host(state.diverged_at)
            if on_nan == "stop":
                _stop_if_diverged(cfg, diverged_at, healthy_before, budget,
                                  bool(checkpoint and history["step"]), bar)
            dead = recipe.dead_mask(self.host(state.since_fired), self.run_cfg.dead_tokens)
            _record(history, end, sharding.to_host(sums), final if self.evalset else None,
                    dead.mean(axis=1), diverged_at < 0)
            bar.set_postfix(_postfix(cfg, history))
            if checkpoint is not None:
                save_checkpoint(checkpoint, config={**cfg.to_dict(), **self.run_info}, step=end,
                                state=self.host(state), history=history,
                                seconds=self.clock.seconds())
            start = end
        bar.close()
        self.batches.close()
        return self._result(final)

    @staticmethod
    def host(tree):
        """numpy copies, stacked on the model axis whatever the layout."""
        return batching.stacked(sharding.to_host(tree))

    def zero_sums(self) -> jax.Array:
        """Per-model (loss x rows, rec x rows, rows) accumulators for one segment."""
        with sharding.use(self.mesh):
            spec = sharding.leaf_spec((), 2)
        return sharding.put(np.zeros((len(self.cfg.ks), 3), np.float32), spec, self.mesh)

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
        return SweepResult(host.params, per_model, self.clock.seconds(), self.clock.compile_seconds,
                           _divergence(self.cfg, host.diverged_at, self.budget.steps_per_epoch),
                           self.budget, final if self.evalset else None, host.since_fired)


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


def _train_segment(step_fn, state, batches, cfg, budget, start: int, end: int, clock: _Clock, bar,
                   sums):
    """Steps start..end-1 of the budget; sums of (loss, rec) x rows and rows, per model."""
    for s in range(start, end):
        tc = time.perf_counter()
        state, sums = step_fn(state, sums, next(batches), k_at(cfg, s, budget.steps), np.int32(s))
        if clock.compile_seconds == 0.0:
            jax.block_until_ready(sums)
            clock.compile_seconds = time.perf_counter() - tc
        bar.update()
    return state, sums


def _stop_if_diverged(cfg, diverged_at: np.ndarray, healthy_before, budget: Budget, kept: bool,
                      bar) -> None:
    newly = healthy_before & (diverged_at >= 0)
    if not newly.any():
        return
    bar.close()
    where = _divergence(cfg, np.where(newly, diverged_at, -1), budget.steps_per_epoch)
    lines = ", ".join(f"k={k} at step {w['step']} (epoch {w['epoch']})" for k, w in where.items())
    raise Diverged(f"non-finite loss or outputs: {lines}"
                   f"{'; the previous checkpoint is kept' if kept else ''}")


def _postfix(cfg: SweepConfig, history: dict) -> dict:
    """Progress bar: mean train loss of the healthy models, and FVU / dead % for SAEs."""
    def mean(name):
        v = [x for x in history[name][-1] if x is not None] if history[name] else []
        return sum(v) / len(v) if v else math.nan

    if cfg.model.is_image:
        return {"loss": f"{mean('train_loss'):.4f}"}
    return {"fvu": f"{mean('train_rec'):.4f}", "dead": f"{100 * mean('window_dead_frac'):.1f}%"}
