"""How the models of a sweep share one compiled program: vmap over stacked arrays, or a loop
over per-model arrays in which each model keeps its own static top-k width.

With "loop" the train state is held as `Models`, one pytree per model, so that each model's
step reads and updates its own (donated) buffers in place: slicing models out of stacked
arrays and writing them back made XLA copy every slice (for a 16,384 x 768 SAE, 24 copies of
50 MB per step). Results, checkpoints and files always see stacked arrays (`stacked`).
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import sharding
from ksae_jax.config import SweepConfig


class Models(tuple):
    """One pytree per model of a sweep (the "loop" layout of a stacked pytree)."""


jax.tree_util.register_pytree_node(Models, lambda t: (tuple(t), None), lambda _, c: Models(c))


def choose(platform: str) -> str:
    """"loop" on CPU, "vmap" on accelerators (whatever the arch).

    Measured on 2 CPU cores: vmap turns the conv network's per-model convolutions into
    grouped convolutions, which XLA:CPU runs several times slower; it runs every model of an
    MLP or SAE sweep at the largest k (an MLP sweep of k = 10..100 took 1.2-1.45x its models
    one after another, looped 1.0x) and batches an SAE's gathers and scatters (one
    16,384-latent model: 2.6 s vmapped, 1.4 s looped). GPUs and TPUs run the grouped and
    batched ops well."""
    return "loop" if platform == "cpu" else "vmap"


def resolve(cfg: SweepConfig, platform: str | None = None) -> str:
    """The sweep's batching, with "auto" resolved for its arch and the default backend; vmap
    whenever a mesh splits the models over devices (each device runs its own models)."""
    if cfg.execution.batching != "auto":
        return cfg.execution.batching
    if sharding.axis_size("model") > 1:
        return "vmap"
    return choose(platform or jax.default_backend())


def split(tree, n: int) -> Models:
    """A stacked pytree (leading model axis) as Models."""
    return Models(jax.tree.map(lambda a: a[m], tree) for m in range(n))


def stacked(tree):
    """Models (anywhere in the tree) stacked back on a leading axis; numpy stays numpy."""
    def stack(x):
        if not isinstance(x, Models):
            return x
        return jax.tree.map(lambda *a: (np.stack if isinstance(a[0], np.ndarray) else jnp.stack)(a), *x)

    return jax.tree.map(stack, tree, is_leaf=lambda x: isinstance(x, Models))


def layout(tree, how: str, n: int):
    """A stacked pytree in the layout a batching works on."""
    return split(tree, n) if how == "loop" else tree


def models_slice(tree, start: int, stop: int):
    """Models start..stop-1 of a per-model pytree (stacked, or Models), in its layout."""
    if isinstance(tree, Models):
        return Models(tree[start:stop])
    return jax.tree.map(lambda a: a[start:stop], tree)


def take(arg, m: int):
    """Model m's part of a per-model argument (stacked or Models)."""
    return arg[m] if isinstance(arg, Models) else jax.tree.map(lambda a: a[m], arg)


def over_models(fn: Callable, cfg: SweepConfig, how: str, per_model: tuple, shared: tuple = ()):
    """fn(*model_args, *shared, max_k=...) -> tuple, for every model of the sweep.

    per_model: arguments with one entry per model (stacked, or Models); shared: the same for
    every model. vmap runs all models at the sweep's largest top-k width and stacks each
    output; the loop gives each model its own (cfg.max_ks), so that a sweep costs what its
    models cost, and returns each output as Models.
    """
    if how == "vmap":
        in_axes = (0,) * len(per_model) + (None,) * len(shared)
        return jax.vmap(lambda *a: fn(*a, max_k=cfg.max_k), in_axes=in_axes)(*per_model, *shared)
    outs = [fn(*(take(a, m) for a in per_model), *shared, max_k=cfg.max_ks[m])
            for m in range(cfg.n_models)]
    return tuple(Models(o[i] for o in outs) for i in range(len(outs[0])))
