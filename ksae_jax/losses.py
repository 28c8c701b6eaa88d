"""Training objectives. Images: reconstruction error + lambda * L1 on activations (the
original's). Vectors: FVU, plus Multi-TopK and AuxK (Gao et al. 2024). AuxK can be added to
the image models' code layer too. Every loss returns (loss, metrics): metrics["rec"] is the
reconstruction term (MSE for images, FVU for vectors) and metrics["fired"] the code units
active on a real row of the batch (for the dead-latent counters)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ksae_jax import models
from ksae_jax.config import SweepConfig
from ksae_jax.models import sae
from ksae_jax.topk import sparsify

MULTI_TOPK_FACTOR, MULTI_TOPK_WEIGHT = 4, 1 / 8


def _per_example_mean(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(axis=1)


def _per_example_sum(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def _weighted_mean(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean over the real examples of a batch (weight 0 marks padding)."""
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def total_variance(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum over real rows of |x - mean x|^2: the FVU denominator."""
    flat = x.reshape(x.shape[0], -1)
    mean = (w @ flat) / jnp.maximum(w.sum(), 1.0)
    return jnp.sum(w * _per_example_sum(jnp.square(flat - mean)))


def fvu(recon: jax.Array, x: jax.Array, w: jax.Array, denom: jax.Array) -> jax.Array:
    """Fraction of variance unexplained: sum of squared error / total variance."""
    return jnp.sum(w * _per_example_sum(jnp.square(recon - x))) / jnp.maximum(denom, 1e-30)


def fired_units(idx: jax.Array, values: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """(n,) bool: units with a positive kept value on a real row."""
    on = ((values > 0) & (w[:, None] > 0)).reshape(-1)
    return jnp.zeros(n, bool).at[idx.reshape(-1)].max(on, mode="promise_in_bounds")


def auxk_loss(select_dead, decode_dead, x, w, recon, dead, aux_k: int, denom) -> jax.Array:
    """AuxK: the aux_k largest activations among dead units reconstruct the residual.

    select_dead(masked_pre) -> (values, idx) of the dead units kept (values 0 where the unit
    is not dead), decode_dead(values, idx) -> what they add to the reconstruction.
    Scaled by min(n_dead / aux_k, 1) and normalised by the total variance; skipped (0)
    when no unit is dead.
    """
    n_dead = jnp.sum(dead)

    def on():
        values, idx = select_dead(dead)
        e_hat = decode_dead(values, idx)
        e = lax.stop_gradient(x - recon)
        scale = jnp.minimum(n_dead / aux_k, 1.0)
        return scale * fvu(e_hat, e, w, denom)

    return lax.cond(n_dead > 0, on, lambda: jnp.zeros((), x.dtype))


# ---------------------------------------------------------------- images

def reconstruction_error(out: models.images.Output, x: jax.Array, kind: str) -> jax.Array:
    """Per-example reconstruction error: mean squared error, or BCE on the logits."""
    if kind == "bce":
        return _per_example_mean(optax.sigmoid_binary_cross_entropy(out.logits, x))
    return _per_example_mean(jnp.square(out.recon - x))


def l1_penalty(acts) -> jax.Array:
    """Per-example sum over the activations of mean |a| (the original's sparsity term)."""
    return sum(_per_example_mean(jnp.abs(a)) for a in acts)


def image_loss(params: dict, batch: dict, k, l1, dead, *, cfg: SweepConfig, max_k: int):
    """Scalar loss of one image model on one batch, and its metrics.

    batch["x"]: (B, 28, 28) in [0, 1]; batch["w"]: (B,) 1 for real examples, 0 for padding;
    k, l1: this model's k and lambda (traced); dead: (hidden,) bool, for AuxK.
    """
    mc = cfg.model
    net = models.bind(mc, params)
    x, w = batch["x"], batch["w"]
    dense, enc_acts = net.encode_dense(x)
    code = sparsify(dense, k, max_k)
    recon, logits, dec_acts = net.decode_all(code)
    out = models.images.Output(recon, logits, code, enc_acts + (code,) + dec_acts)
    rec = _weighted_mean(reconstruction_error(out, x, mc.loss), w)
    mse = rec if mc.loss == "mse" else _weighted_mean(_per_example_mean(jnp.square(recon - x)), w)
    loss = rec + l1 * _weighted_mean(l1_penalty(out.acts), w)
    if cfg.aux_coef:
        def select_dead(dead):
            values, idx = lax.top_k(jnp.where(dead, dense, -jnp.inf), cfg.aux_k)
            return jnp.where(dead[idx], jax.nn.relu(values), 0.0), idx

        def decode_dead(values, idx):
            rows = jnp.arange(idx.shape[0])[:, None]
            z = jnp.zeros_like(dense).at[rows, idx].add(values)
            return net.decode_all(z)[0] - net.decode_all(jnp.zeros_like(dense))[0]

        loss += cfg.aux_coef * auxk_loss(select_dead, decode_dead, x, w, recon, dead, cfg.aux_k,
                                         total_variance(x, w))
    fired = jnp.any((code != 0) & (w[:, None] > 0), axis=0)
    return loss, {"loss": loss, "rec": mse, "fired": fired}


# ---------------------------------------------------------------- vectors

def sae_loss(params: dict, batch: dict, k, l1, dead, *, cfg: SweepConfig, max_k: int):
    """FVU (+ Multi-TopK FVU at 4k / 8) (+ aux_coef * AuxK) of one TopK SAE on one batch.

    batch["x"]: (B, d) vectors (normalised if cfg.normalize); k: this model's k (traced,
    <= max_k, the static top-k width); l1 is unused (kept for one signature).
    """
    del l1
    mc = cfg.model
    net = models.bind(mc, params)
    x, w = batch["x"], batch["w"]
    width = max_k * (MULTI_TOPK_FACTOR if cfg.multi_topk else 1)
    sparse = sae.use_sparse(mc, width)
    pre = net.preacts(x)
    top, idx = net.select(pre, width)
    values = jax.nn.relu(net.kept_values(top, x, idx, sparse))
    rank = jnp.arange(width)
    main = jnp.where(rank[:max_k] < k, values[:, :max_k], 0.0)
    recon = net.decode_sparse(main, idx[:, :max_k], sparse) + net.b_dec[...]
    denom = total_variance(x, w)
    rec = fvu(recon, x, w, denom)
    loss = rec
    if cfg.multi_topk:
        multi = jnp.where(rank < MULTI_TOPK_FACTOR * k, values, 0.0)
        loss += MULTI_TOPK_WEIGHT * fvu(net.decode_sparse(multi, idx, sparse) + net.b_dec[...],
                                        x, w, denom)
    if cfg.aux_coef:
        def select_dead(dead):
            masked, ids = net.select(pre, cfg.aux_k, dead)
            vals = jax.nn.relu(net.kept_values(masked, x, ids, sparse))
            return jnp.where(dead[ids], vals, 0.0), ids

        def decode_dead(values, ids):
            return net.decode_sparse(values, ids, sparse)

        loss += cfg.aux_coef * auxk_loss(select_dead, decode_dead, x, w, recon, dead, cfg.aux_k,
                                         denom)
    fired = fired_units(idx[:, :max_k], main, w, mc.hidden)
    return loss, {"loss": loss, "rec": rec, "fired": fired}


def loss_fn(cfg: SweepConfig):
    """The training loss of the sweep's model family."""
    return image_loss if cfg.model.is_image else sae_loss
