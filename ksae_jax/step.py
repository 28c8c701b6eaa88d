"""The train step: the loss (assembled once, for every family: reconstruction + penalty +
AuxK), a pure optax step of one model with the recipe's steps around the update, one compiled
step for every model of a sweep, the train state they carry, its initialisation and layouts,
and the k schedule."""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ksae_jax import batching, optim, recipe, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.data.feed import Rows

MAX_DEAD_TOKENS = 10_000_000


class TrainState(NamedTuple):
    """Everything a sweep carries from step to step (leading axis = model)."""

    params: dict
    opt_state: tuple
    since_fired: jax.Array  # (models, latents) int32: training rows since each unit fired
    diverged_at: jax.Array  # (models,) int32: global step at which a model diverged, or -1


def loss_fn(params, batch, hp, dead, *, cfg: SweepConfig, max_k: int | None, objective=None):
    """(loss, (metrics, forward output)) of one model on one batch {"x", "w"}: the family's
    reconstruction objective (or, with an end-to-end `objective`, lm.e2e's loss through
    the LM), plus its weighted penalty, plus aux_coef * AuxK over the `dead` units."""
    family, aux_coef = cfg.family, cfg.model.aux_coef
    x, w = batch["x"], batch["w"]
    out = family.forward(params, x, w, hp, max_k, dead=dead if aux_coef else None)
    terms = family.loss_terms(out, hp)
    loss = terms.reconstruction
    if objective is not None:
        loss = objective.loss(loss, out.recon, batch)
    if terms.penalty is not None:
        loss = loss + terms.penalty
    if out.auxk is not None:  # AuxK is on and a dead mask was given
        loss = loss + aux_coef * out.auxk
    metrics = {"loss": loss, "rec": getattr(out, family.rec_name), "fired": family.fired(out, w)}
    return loss, (metrics, out)


def train_step(params, opt_state, since_fired, hp, alive, batch, step, *, cfg: SweepConfig,
               max_k: int | None, objective=None):
    """One optimizer step of one model on one batch {"x", "w"} (w = 0: padding).

    hp: this model's hyperparameters ({"lr"}, "k" where the family keeps k, and the
    family's, traced). The parameters are left unchanged when `alive` is False or the loss
    or a gradient is not finite (metrics["finite"]); the optimizer state of such a step is
    not used again. (An update that overflows from finite gradients shows in the model's
    outputs, which the training loop checks at every evaluation point.)
    """
    family = cfg.family
    hooks = family.recipe
    batch = own_rows(batch, hp)
    dead = recipe.dead_mask(since_fired, cfg.model.dead_tokens)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, cfg=cfg, max_k=max_k,
                                                   objective=objective), has_aux=True)
    (loss, (metrics, out)), grads = grad_fn(params, batch, hp, dead)
    grads = hooks.project_grads(params, grads, cfg.model)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    direction, opt_state = optim.make_optimizer(cfg.optim).update(grads, opt_state)
    # the update is masked, not the result selected: every buffer stays updated in place
    # (selecting between old and new states forced fresh buffers: MLP step 20 -> 35 ms)
    keep = finite & alive
    o = cfg.optim
    rate = optim.learning_rate(hp["lr"], step, o.warmup_steps, o.lr_decay_frac, cfg.steps or 1)
    new = {name: jax.tree.map(lambda p, u, r=rate * family.lr_scales[name] if name in
                              family.lr_scales else rate: p - jnp.where(keep, r * u, 0.0),
                              params[name], direction[name]) for name in params}
    new = hooks.post_update(new, params, keep, out, cfg.model)
    since_fired = recipe.update_dead_counters(since_fired, metrics["fired"], batch["w"].sum())
    if hooks.resample_every(cfg.model):
        new, opt_state, since_fired = resample_dead(new, opt_state, since_fired, hp, batch,
                                                    step, keep, cfg=cfg, max_k=max_k)
    return new, opt_state, since_fired, {"loss": loss, "rec": metrics["rec"], "finite": finite}



def own_rows(batch: dict, hp: dict) -> dict:
    """The model's rows of a batch: all of them, or its hookpoint's (hp["source"]) where the
    batch holds one set of rows per hookpoint (x: (hookpoints, B, d))."""
    if "source" not in hp:
        return batch
    return {**batch, "x": batch["x"][hp["source"]]}


def resample_dead(params, opt_state, since_fired, hp, batch, step, keep, *, cfg: SweepConfig,
                  max_k: int):
    """When recipe.resample_due: the latents that have not fired in the last resample_every
    steps start again along the residuals of this batch (family.resample), with their
    optimizer moments and dead counters at zero (Bricken et al. 2023's resampling); a model
    whose update did not apply (`keep` False) is left as it is."""
    family = cfg.family
    every = family.recipe.resample_every(cfg.model)

    def reborn(state):
        params, opt_state, since_fired = state
        dead = (since_fired >= every * cfg.batch_size) & keep
        out = family.forward(params, batch["x"], batch["w"], hp, max_k, terms=False)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        dirs = recipe.residual_directions(key, batch["x"] - out.recon, batch["w"],
                                          jnp.cumsum(dead) - 1)
        params = family.recipe.resample(params, dirs, dead)
        rows = _latent_rows(params, dead)
        opt_state = optim.map_moments(opt_state, lambda tree: jax.tree.map(
            lambda leaf, m: jnp.where(m, 0, leaf), tree, rows))
        return params, opt_state, jnp.where(dead, 0, since_fired)

    due = recipe.resample_due(step, every, cfg.steps or 1)
    return lax.cond(due, reborn, lambda state: state, (params, opt_state, since_fired))


def _latent_rows(params: dict, dead) -> dict:
    """A params-shaped tree of masks: the `dead` latents' rows of the latent-indexed leaves."""
    return {name: dead.reshape(dead.shape + (1,) * (leaf.ndim - 1))
            if name in sharding.LATENT_LEAVES else jnp.zeros((), bool)
            for name, leaf in params.items()}


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def hyperparameters(cfg: SweepConfig, ks) -> dict:
    """Per-model hyperparameters of a step (one entry per model): k (the schedule's at this
    step, per label; none for a family without k), the hookpoint whose rows it reads (with
    several), lr, and the family's own (e.g. the image models' L1
    lambda, JumpReLU's L0 coefficient)."""
    return {**({} if ks is None else {"k": jnp.asarray(cfg.per_model(ks), jnp.int32)}),
            **({"source": jnp.asarray(cfg.sources, jnp.int32)} if cfg.hookpoints else {}),
            "lr": jnp.asarray(cfg.lrs, jnp.float32),
            **{name: jnp.asarray(v) for name, v in cfg.family.hyperparameters(cfg).items()}}


@functools.partial(jax.jit, static_argnames=("cfg", "objective"),
                   donate_argnames=("state", "sums"))
def sweep_step(state: TrainState, sums: jax.Array, batch: dict, ks, step, *, cfg: SweepConfig,
               objective=None):
    """One step of every model of the sweep on one batch.

    batch: {"x", "w"}; from a live run's mixing buffer {"buffer", "slots", "w"} (the rows
    drawn here); with an end-to-end `objective` (lm.e2e.SplicedKL), {"tokens", "w", "lm"}:
    the objective's clean pass gives the rows, once for every model.

    ks: each model's k at this step (the k schedule; traced; None for a family without k).
    A model whose loss or gradients
    are not finite keeps its last finite parameters from then on; diverged_at records the
    step. sums accumulates per-model (loss, rec) x real rows, and the real rows.
    """
    if "buffer" in batch:  # a live run's mixing buffer: the batch is drawn inside the step
        batch = {"x": batch["buffer"][:, batch["slots"]], "w": batch["w"]}
    rows = {k: v for k, v in batch.items() if k in ("x", "w", "tokens")}
    batch = {**batch, **sharding.constrain(rows, batch_specs(rows, cfg))}
    if objective is not None:
        batch = objective.prepare(batch)
    alive = state.diverged_at < 0
    per_model = (state.params, state.opt_state, state.since_fired, hyperparameters(cfg, ks), alive)
    params, opt_state, since_fired, m = batching.over_models(
        functools.partial(train_step, cfg=cfg, objective=objective), cfg, batching.resolve(cfg), per_model,
        (batch, step))
    m = batching.stacked(m)
    diverged_at = jnp.where(alive & ~m["finite"], step, state.diverged_at)
    n = batch["w"].sum()
    new = jnp.stack([m["loss"] * n, m["rec"] * n, jnp.full_like(m["loss"], n)], axis=-1)
    sums = sums + jnp.where((alive & m["finite"])[:, None], new, 0.0)
    state = TrainState(params, opt_state, since_fired, diverged_at)
    return sharding.constrain(state, sharding.state_specs(state)), sums


def batch_specs(batch: dict, cfg: SweepConfig) -> dict:
    """How a batch's arrays are split over the mesh: rows over the data axis (with several
    hookpoints, x is (hookpoints, rows, d): its second axis)."""
    def spec(name, v):
        if name == "x" and cfg.hookpoints:
            return sharding.P(None, *sharding.batch_spec(v.ndim - 1))
        return sharding.batch_spec(v.ndim)
    return {name: spec(name, v) for name, v in batch.items()}


def init_state(cfg: SweepConfig, rows: Rows | None = None, params: dict | None = None,
               mesh=None) -> TrainState:
    """Fresh models, one per k (init seeds cfg.seeds), with what the family initialises from
    the training rows (e.g. a TopK SAE's b_dec) when they are given; or, with `params`
    (stacked, e.g. an imported SAE), models that start from those, with fresh Adam states.

    It runs as one jitted program whose outputs are placed as the mesh shards them: no
    process builds an array that is split across devices, on the host or on one device.
    The rows it reads (family.data_sample) are each process's own, combined by the
    program's collectives."""
    sample = None if rows is None or params is not None else cfg.family.recipe.data_sample(
        rows, cfg, mesh)
    fn = functools.partial(_fresh_state, cfg)
    out = sharding.state_shardings(jax.eval_shape(fn, sample, params), mesh)
    with sharding.use(mesh):
        return jax.jit(fn, out_shardings=out)(sample, params)


def _fresh_state(cfg: SweepConfig, sample, params) -> TrainState:
    family = cfg.family
    if params is None:
        keys = jax.vmap(jax.random.key)(jnp.asarray(cfg.seeds, jnp.uint32))
        params = jax.vmap(family.init)(keys)
        if sample is not None:
            params = family.recipe.init_from_data(params, sample, cfg)
    else:
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    opt_state = jax.vmap(optim.make_optimizer(cfg.optim).init)(params)
    n = cfg.n_models
    return TrainState(params, opt_state, jnp.zeros((n, cfg.model.units), jnp.int32),
                      jnp.full(n, -1, jnp.int32))


def state_layout(state: TrainState, how: str) -> TrainState:
    """The state as a batching works on it: per-model params, Adam states and counters for
    "loop" (batching.Models), stacked for "vmap"; divergence steps stay stacked."""
    n = len(state.diverged_at)
    return state._replace(**{f: batching.layout(getattr(state, f), how, n)
                             for f in ("params", "opt_state", "since_fired")})


def resolved(cfg: SweepConfig, n_rows: int) -> SweepConfig:
    """cfg as the step runs it: the data-dependent defaults filled in (dead_tokens) and the
    budget in steps (what the learning-rate schedule counts)."""
    steps = cfg.steps or cfg.epochs * -(-n_rows // cfg.batch_size)
    dead = cfg.model.dead_tokens or min(MAX_DEAD_TOKENS, n_rows)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dead_tokens=dead),
                               steps=steps, epochs=None)


def k_at(cfg: SweepConfig, step: int, total_steps: int) -> np.ndarray | None:
    """Per-model k at a step: the schedule's k (from k_start towards each k over the first
    k_anneal_frac of the budget), or the target k; None for a family without k."""
    if not cfg.ks:
        return None
    ks, start, frac = np.asarray(cfg.ks), cfg.optim.k_start, step / total_steps
    if start is None or frac >= cfg.optim.k_anneal_frac:
        return ks.astype(np.int32)
    moved = start + frac / cfg.optim.k_anneal_frac * (ks - start)
    return np.maximum(ks, np.round(moved)).astype(np.int32)
