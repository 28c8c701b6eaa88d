"""How the models of a sweep share one compiled program: vmap, or an unrolled loop in which
each model keeps its own static top-k width."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ksae_jax import sharding
from ksae_jax.config import SweepConfig


def choose(arch: str, platform: str) -> str:
    """"loop" for the conv network on CPU (vmap turns its per-model convolutions into grouped
    convolutions, which XLA:CPU runs several times slower), "vmap" everywhere else."""
    return "loop" if arch == "conv" and platform == "cpu" else "vmap"


def resolve(cfg: SweepConfig, platform: str | None = None) -> str:
    """The sweep's batching, with "auto" resolved for its arch and the default backend; vmap
    whenever a mesh splits the models over devices (each device runs its own models)."""
    if cfg.batching != "auto":
        return cfg.batching
    if sharding.axis_size("model") > 1:
        return "vmap"
    return choose(cfg.model.arch, platform or jax.default_backend())


def over_models(fn: Callable, cfg: SweepConfig, batching: str, per_model: tuple,
                shared: tuple = ()):
    """fn(*model_args, *shared, max_k=...) for every model, outputs stacked on a leading axis.

    per_model: arguments with a leading model axis; shared: the same for every model.
    vmap runs all models at the sweep's largest top-k width; the loop gives each model its
    own (cfg.max_ks), so a sweep costs what its models cost.
    """
    if batching == "vmap":
        in_axes = (0,) * len(per_model) + (None,) * len(shared)
        return jax.vmap(lambda *a: fn(*a, max_k=cfg.max_k), in_axes=in_axes)(*per_model, *shared)
    outs = [fn(*jax.tree.map(lambda a: a[m], per_model), *shared, max_k=cfg.max_ks[m])
            for m in range(len(cfg.ks))]
    return jax.tree.map(lambda *o: jnp.stack(o), *outs)
