"""The TopK SAE recipe's pieces, each a small pure function the train step calls in a visible
order: unit-norm decoder rows, the gradient projection that keeps them so, dead-latent
counters, and the geometric median that initialises b_dec."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

COUNTER_CAP = 2 ** 30  # counters saturate here (int32), far above any dead_tokens


def unit_norm_rows(W: jax.Array, eps: float = 1e-12) -> jax.Array:
    """W with every row scaled to unit L2 norm."""
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), eps)


def remove_parallel_component(W: jax.Array, grad: jax.Array) -> jax.Array:
    """grad minus, for each row, its component along that (unit) row of W: the step then
    moves each decoder row along the sphere, to first order."""
    return grad - jnp.sum(grad * W, axis=-1, keepdims=True) * W


def update_dead_counters(since_fired: jax.Array, fired: jax.Array, n_rows) -> jax.Array:
    """Training vectors since each unit last fired: reset where it fired, else + n_rows."""
    grown = jnp.minimum(since_fired + n_rows.astype(since_fired.dtype), COUNTER_CAP)
    return jnp.where(fired, 0, grown)


def dead_mask(since_fired: jax.Array, dead_tokens: int) -> jax.Array:
    """Units that have not fired in the last dead_tokens training vectors."""
    return since_fired > dead_tokens


@jax.jit
def geometric_median(points: jax.Array, valid: jax.Array | None = None, max_iter: int = 100,
                     tol: float = 1e-5) -> jax.Array:
    """The point minimising the sum of Euclidean distances to the `valid` rows of `points`
    (N, d) (all without a mask), by Weiszfeld's iteration from their mean (a point that
    lands on a sample is kept away by a tiny floor)."""
    points = points.astype(jnp.float32)
    real = jnp.ones(points.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)

    def step(state):
        guess, _, i = state
        dist = jnp.maximum(jnp.linalg.norm(points - guess, axis=1), 1e-8)
        weights = real / dist
        new = (weights @ points) / weights.sum()
        return new, jnp.linalg.norm(new - guess), i + 1

    def going(state):
        _, moved, i = state
        return (moved > tol) & (i < max_iter)

    start = points.mean(axis=0) if valid is None else (real @ points) / real.sum()
    median, _, _ = lax.while_loop(going, step, (start, jnp.asarray(jnp.inf, jnp.float32), 0))
    return median


@functools.partial(jax.jit, static_argnames="k")
def fitted_encoder_scale(x_c: jax.Array, W_dec: jax.Array, k: int,
                         valid: jax.Array | None = None) -> jax.Array:
    """The s for which W_enc = s W_dec reconstructs the centred rows x_c best at init: with
    z = ReLU(TopK(x_c W_dec^T)) and r = z W_dec, the reconstruction is s r, and
    s = <x_c, r> / <r, r> minimises |x_c - s r|^2 summed over the (valid) rows. For k
    latents of random directions r grows about as sqrt(k), so the best s falls with k."""
    vals, idx = jax.lax.top_k(x_c @ W_dec.T, k)
    r = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), W_dec[idx])
    w = 1.0 if valid is None else valid.astype(r.dtype)[:, None]
    return jnp.sum(w * x_c * r) / jnp.maximum(jnp.sum(w * r * r), 1e-30)


def data_directions(x_c: jax.Array, valid: jax.Array, n: int, key: jax.Array) -> jax.Array:
    """(n, d) unit rows along n of the (valid) centred rows x_c, drawn without replacement
    when there are enough; with replacement (and a little noise, so that no two rows are
    equal) when n exceeds them."""
    p = valid.astype(jnp.float32) / jnp.maximum(jnp.sum(valid), 1)
    replace = n > x_c.shape[0]
    idx = jax.random.choice(key, x_c.shape[0], (n,), replace=replace, p=p)
    rows = unit_norm_rows(x_c[idx])
    if replace:
        noise = jax.random.normal(jax.random.fold_in(key, 1), rows.shape)
        rows = unit_norm_rows(rows + 0.3 * unit_norm_rows(noise))
    return rows
