"""Training objective: reconstruction error + lambda * L1 on activations, as the original."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from ksae_jax import model
from ksae_jax.config import ModelConfig


def _per_example_mean(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(axis=1)


def _weighted_mean(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean over the real examples of a batch (weight 0 marks padding)."""
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def reconstruction_error(out: model.Output, x: jax.Array, kind: str) -> jax.Array:
    """Per-example reconstruction error: mean squared error, or BCE on the logits."""
    if kind == "bce":
        return _per_example_mean(optax.sigmoid_binary_cross_entropy(out.logits, x))
    return _per_example_mean(jnp.square(out.recon - x))


def l1_penalty(acts) -> jax.Array:
    """Per-example sum over the activations of mean |a| (the original's sparsity term)."""
    return sum(_per_example_mean(jnp.abs(a)) for a in acts)


def ksae_loss(params: dict, x: jax.Array, weight: jax.Array, k, l1, *, cfg: ModelConfig,
              max_k: int):
    """Scalar loss of one model on one batch and its metrics.

    x: (B, 28, 28) in [0, 1]; weight: (B,) 1 for real examples, 0 for batch padding;
    k, l1: this model's k and lambda (traced, so one program serves a whole sweep).
    """
    out = model.apply(cfg, params, x, k, max_k)
    rec = _weighted_mean(reconstruction_error(out, x, cfg.loss), weight)
    mse = rec if cfg.loss == "mse" else _weighted_mean(_per_example_mean(jnp.square(out.recon - x)), weight)
    penalty = _weighted_mean(l1_penalty(out.acts), weight)
    loss = rec + l1 * penalty
    return loss, {"loss": loss, "mse": mse}
