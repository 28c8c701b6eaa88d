"""Held-out metrics of every model of a sweep: MSE, FVU, L0 and how often each code unit fires."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import numpy as np

from ksae_jax import batching, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.data.feed import Rows, gather


class EvalResult(NamedTuple):
    """Per-model metrics over a whole held-out set (arrays with a leading model axis)."""

    mse: np.ndarray         # mean squared error per element (images: pixels in [0, 1])
    fvu: np.ndarray         # sum of squared error / total variance of the held-out set
    l0: np.ndarray          # mean number of non-zero code units per row
    dead_frac: np.ndarray   # fraction of units that never fire on the set
    counts: np.ndarray      # (models, latents): rows on which each unit fires
    n: int                  # rows in the set
    extra: dict = {}        # family-specific FVUs, e.g. "prefix_fvu" (models, prefixes)


class EvalSet:
    """Held-out rows put on the device once, with each column's total variance (FVU's
    denominator sums the columns the family reconstructs); the host's copy is not kept."""

    def __init__(self, rows: Rows, batch_size: int = 1024, put=jax.device_put):
        self.scale, self.batch_size, self.n = rows.scale, min(batch_size, rows.n), rows.n
        host = rows.all()
        self.data = put(host)
        self.order = put(np.concatenate(
            [np.arange(self.n), np.full(-self.n % self.batch_size, -1)]).astype(np.int32))
        flat = host.reshape(self.n, -1).astype(np.float64) * rows.scale
        self.variance = ((flat - flat.mean(axis=0)) ** 2).sum(axis=0)  # per column


def _sums(params, hp, batch, *, cfg: SweepConfig, max_k: int | None):
    """The family's evaluation sums (squared error, firing counts, ...) of one model on one
    batch: its forward (the one training runs), without the loss terms."""
    family = cfg.family
    x, w = batch["x"], batch["w"]
    return (family.eval_sums(family.forward(params, x, w, hp, max_k, terms=False), x, w),)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "how"))
def _eval_batch(params, data, order, i, scale, hp, *, cfg: SweepConfig, batch_size: int,
                how: str):
    batch = gather(data, order, i, scale, batch_size=batch_size)
    fn = functools.partial(_sums, cfg=cfg)
    return batching.stacked(batching.over_models(fn, cfg, how, (params, hp), (batch,)))[0]


def evaluate(cfg: SweepConfig, params, evalset: EvalSet, ks=None) -> EvalResult:
    """Every model's metrics over all of `evalset` (models keep their own k, or `ks`)."""
    how = batching.resolve(cfg)
    hp = {} if not cfg.ks else {"k": np.asarray(cfg.ks if ks is None else ks, np.int32)}
    sums = None
    for i in range(evalset.order.shape[0] // evalset.batch_size):
        got = _eval_batch(params, evalset.data, evalset.order, np.int32(i),
                          np.float32(evalset.scale), hp,
                          cfg=cfg, batch_size=evalset.batch_size, how=how)
        sums = got if sums is None else jax.tree.map(lambda a, b: a + b, sums, got)
    sums = {name: np.asarray(v, np.float64) for name, v in sharding.to_host(sums).items()}
    sse, counts = sums.pop("sse"), sums.pop("counts").astype(np.float32)
    target = evalset.variance[cfg.family.target_columns()]
    denom, n_elements = max(float(target.sum()), 1e-30), evalset.n * target.size
    # images: MSE on pixels in [0, 1], as the original; vectors: in the data's own units
    unit = cfg.family.mse_unit(evalset.scale)
    return EvalResult(mse=sse / n_elements / unit, fvu=sse / denom,
                      l0=counts.sum(axis=1) / evalset.n, dead_frac=(counts == 0).mean(axis=1),
                      counts=counts, n=evalset.n,
                      extra=cfg.family.held_out_extras(sums, evalset.n, denom))


def evaluate_each(cfg: SweepConfig, params, evalsets: list[EvalSet]) -> EvalResult:
    """evaluate on one held-out set, or, with hookpoints, each hookpoint's models on its own
    set (the results joined on the model axis)."""
    if not cfg.hookpoints:
        return evaluate(cfg, params, evalsets[0])
    n = len(cfg.labels)
    parts = [evaluate(cfg.one_sweep, batching.models_slice(params, h * n, (h + 1) * n), e)
             for h, e in enumerate(evalsets)]
    join = lambda *a: np.concatenate(a)  # noqa: E731
    return EvalResult(*(join(*(getattr(p, f) for p in parts)) for f in
                        ("mse", "fvu", "l0", "dead_frac", "counts")), n=parts[0].n,
                      extra=jax.tree.map(join, *(p.extra for p in parts)))
