"""The TopK SAE recipe's pieces, each a small pure function the train step calls in a visible
order: unit-norm decoder rows, the gradient projection that keeps them so, dead-latent
counters, and the geometric median that can initialise b_dec."""
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


def resample_due(step, every: int, total_steps: int):
    """Whether the latents are resampled after this step (counted from 0): after every
    `every` steps while at most half the budget is done."""
    done = step + 1
    return (every > 0) & (done % max(every, 1) == 0) & (2 * done <= total_steps)


def residual_directions(key, residual: jax.Array, w: jax.Array, rank: jax.Array) -> jax.Array:
    """(n, d) unit directions, one per latent: the residuals of the real batch rows ordered
    by a draw with probabilities proportional to their squared norms, without replacement
    (Gumbel top-k), and the latent of `rank` r taking the r-th (cycling past the batch)."""
    sq = jnp.sum(jnp.square(residual), axis=-1) * w
    scores = jnp.where(sq > 0, jnp.log(jnp.where(sq > 0, sq, 1.0)), -jnp.inf)
    order = jnp.argsort(-(scores + jax.random.gumbel(key, sq.shape)))
    return unit_norm_rows(residual[order[jnp.maximum(rank, 0) % residual.shape[0]]])


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


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def fitted_encoder_scale(x_c: jax.Array, W_dec: jax.Array, k: int,
                         valid: jax.Array | None = None, chunk: int = 64) -> jax.Array:
    """The s for which W_enc = s W_dec reconstructs the centred rows x_c best at init: with
    z = ReLU(TopK(x_c W_dec^T)) and r = z W_dec, the reconstruction is s r, and
    s = <x_c, r> / <r, r> minimises |x_c - s r|^2 summed over the (valid) rows. For k
    latents of random directions r grows about as sqrt(k), so the best s falls with k.
    Taken over `chunk` rows at a time: its (chunk, n) pre-activations are all it holds."""
    valid = jnp.ones(x_c.shape[0], bool) if valid is None else valid
    pad = (-x_c.shape[0]) % chunk
    x = jnp.pad(x_c, ((0, pad), (0, 0))).reshape(-1, chunk, x_c.shape[1])
    w = jnp.pad(valid, (0, pad)).reshape(-1, chunk).astype(x_c.dtype)

    def sums(part):
        xc, wc = part
        vals, idx = jax.lax.top_k(xc @ W_dec.T, k)
        r = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), W_dec[idx])
        return jnp.sum(wc[:, None] * xc * r), jnp.sum(wc[:, None] * r * r)

    num, den = jax.lax.map(sums, (x, w))
    return jnp.sum(num) / jnp.maximum(jnp.sum(den), 1e-30)


def balanced_bias(x_c: jax.Array, W_enc: jax.Array, k: int, valid: jax.Array | None = None,
                  chunk: int = 64, mean_keep: float = 1.0) -> jax.Array:
    """(n,) b_enc that puts each latent's threshold at its own (1 - k/n) quantile over the
    centred rows x_c: every latent starts positive on r = ceil(rows k / n) of the (valid)
    rows, at least one, so that none starts out never chosen; less (1 - mean_keep) times the
    thresholds' mean (the same latents chosen, their values less shrunk). The rows are taken `chunk` at
    a time, each latent keeping its r + 1 largest pre-activations so far: it holds (n,
    chunk + r + 1) numbers, all of them along the latents (split as W_enc is split)."""
    n, rows = W_enc.shape[0], x_c.shape[0]
    if rows < 2:
        return jnp.zeros(n, W_enc.dtype)
    valid = jnp.ones(rows, bool) if valid is None else valid
    r = min(max(1, -(-rows * k // n)), rows - 1)
    pad = (-rows) % chunk
    xs = jnp.pad(x_c, ((0, pad), (0, 0))).reshape(-1, chunk, x_c.shape[1])
    vs = jnp.pad(valid, (0, pad)).reshape(-1, chunk)

    def merge(top, part):
        xc, vc = part
        pre = jnp.where(vc[None, :], W_enc @ xc.T, -jnp.inf)  # (n, chunk)
        return jax.lax.top_k(jnp.concatenate([top, pre], axis=1), r + 1)[0], None

    top, _ = jax.lax.scan(merge, jnp.full((n, r + 1), -jnp.inf, W_enc.dtype), (xs, vs))
    t = 0.5 * (top[:, -2] + top[:, -1])  # halfway between the r-th largest and the next
    t = jnp.where(jnp.isfinite(t), t, 0.0)
    return -(t - (1 - mean_keep) * t.mean())


DIVERSE_COS = 0.9  # init_dirs "diverse": rows this close to a row of higher priority wait
DIVERSE_BLOCK = 2048


def diverse_priority(x_c: jax.Array, order: jax.Array, cos: float = DIVERSE_COS) -> jax.Array:
    """`order` with every row whose direction lies within `cos` of a real row of higher
    priority (lower order) moved behind all the others (their order kept among them): rows
    taken in the new order are pairwise less similar than `cos` while there are enough."""
    unit = unit_norm_rows(x_c)
    real = jnp.isfinite(order)
    crowded = []
    for start in range(0, x_c.shape[0], DIVERSE_BLOCK):
        block = slice(start, start + DIVERSE_BLOCK)
        sim = unit[block] @ unit.T
        before = (order[None, :] < order[block, None]) & real[None, :]
        crowded.append(jnp.any((sim > cos) & before, axis=1))
    crowded = jnp.concatenate(crowded)
    return jnp.where(crowded & real, order + 2.0, order)  # orders lie in [0, 1)


def data_directions(x_c: jax.Array, order: jax.Array, n: int, key: jax.Array,
                    noise: float = 0.0) -> jax.Array:
    """(n, d) unit rows along the centred rows x_c taken in `order` (a random priority per
    row, inf for padding: the same rows whatever the padding), each drawn once while there
    are enough; past them the rows repeat, mixed with 0.3 of a random direction so that no
    two are equal. With noise, every row is mixed with that much of a random direction."""
    count = jnp.sum(jnp.isfinite(order))
    idx = jnp.argsort(order)[jnp.arange(n) % count]
    rows = unit_norm_rows(x_c[idx])
    g = unit_norm_rows(jax.random.normal(key, rows.shape))
    mix = jnp.where(jnp.arange(n) >= count, max(noise, 0.3), noise)[:, None]
    return unit_norm_rows(rows + mix * g)
