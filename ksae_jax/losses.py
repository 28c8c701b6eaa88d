"""The pieces the families' losses are made of, over a batch whose weights w mark real rows
(1) and padding (0): means over real rows, reconstruction error and the L1 penalty of the
image models, FVU, the firing mask, and AuxK (Gao et al. 2024)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax


def per_example_mean(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(axis=1)


def per_example_sum(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def weighted_mean(per_example: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean over the real examples of a batch (weight 0 marks padding)."""
    return jnp.sum(per_example * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def reconstruction_error(recon: jax.Array, logits: jax.Array, x: jax.Array, kind: str) -> jax.Array:
    """Per-example reconstruction error: mean squared error, BCE on the logits, or half the
    sum of squared errors ("half_sse")."""
    if kind == "bce":
        return per_example_mean(optax.sigmoid_binary_cross_entropy(logits, x))
    if kind == "half_sse":
        return 0.5 * per_example_sum(jnp.square(recon - x))
    return per_example_mean(jnp.square(recon - x))


def l1_penalty(acts) -> jax.Array:
    """Per-example sum over the activations of mean |a| (the original's sparsity term)."""
    return sum(per_example_mean(jnp.abs(a)) for a in acts)


def total_variance(x: jax.Array, w: jax.Array) -> jax.Array:
    """sum over real rows of |x - mean x|^2: the FVU denominator."""
    flat = x.reshape(x.shape[0], -1)
    mean = (w @ flat) / jnp.maximum(w.sum(), 1.0)
    return jnp.sum(w * per_example_sum(jnp.square(flat - mean)))


def fvu(recon: jax.Array, x: jax.Array, w: jax.Array, denom: jax.Array) -> jax.Array:
    """Fraction of variance unexplained: sum of squared error / total variance."""
    return jnp.sum(w * per_example_sum(jnp.square(recon - x))) / jnp.maximum(denom, 1e-30)


def fired_units(idx: jax.Array, values: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """(n,) bool: units with a positive kept value on a real row."""
    on = ((values > 0) & (w[:, None] > 0)).reshape(-1)
    return jnp.zeros(n, bool).at[idx.reshape(-1)].max(on, mode="promise_in_bounds")


def auxk_loss(select_dead, decode_dead, x, w, recon, dead, aux_k: int, denom) -> jax.Array:
    """AuxK: the aux_k largest activations among dead units reconstruct the residual.

    select_dead(dead) -> (values, idx) of the dead units kept (values 0 where the unit
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
