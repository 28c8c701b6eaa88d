"""The TopK SAE's fast paths: after the encoder's one dense matmul, every product touches only
the k kept latents of each vector. Two custom VJPs, each with the dense autodiff reference
it must equal:

- `sparse_preacts(values, x, W_enc, b_enc, b_dec, idx)`: the encoder pre-activations at the
  kept indices (already computed by the matmul and top-k), differentiable in the encoder:
  grad W_enc is a scatter-add of x_c rows into the k rows of each vector, grad b_enc a
  segment sum, grad b_dec = -(grad b_enc) @ W_enc; no dense (B, n) gradient, no second matmul.
- `sparse_decode(values, idx, W_dec)`: sum_j values[:, j] * W_dec[idx[:, j]] by gather;
  backward: grad values by a gather-dot, grad W_dec by a scatter-add of k rows per vector.

Weights are (n, d) row-per-latent (as sparsify's encoder.weight and W_dec), so every gather
and scatter moves whole contiguous rows. The XLA ops loop over the k columns of idx, each
step a fused (B, d) gather or scatter: XLA:CPU is several times faster at these than at one
(B, k, d) gather, which it materialises in fresh memory. With `native` (static) the
gathers and scatters are native_ops' CPU kernels where they serve the operands.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from ksae_jax import native_ops

_IN = "promise_in_bounds"  # indices come from lax.top_k: always in range
_CHUNK = 8                  # columns of idx unrolled per loop step


def _chunks(k: int) -> tuple[int, int]:
    c = _CHUNK if k % _CHUNK == 0 else 1
    return c, k // c


def gather_sum(coef: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    """(B, d): sum_j coef[:, j] * table[idx[:, j]], for coef, idx (B, k) and table (n, d)."""
    c, steps = _chunks(idx.shape[1])

    def body(s, acc):
        cs = lax.dynamic_slice_in_dim(coef, s * c, c, 1)
        ids = lax.dynamic_slice_in_dim(idx, s * c, c, 1)
        return acc + sum(cs[:, j, None] * table.at[ids[:, j]].get(mode=_IN) for j in range(c))

    zero = jnp.zeros((idx.shape[0], table.shape[1]), jnp.result_type(coef, table))
    return lax.fori_loop(0, steps, body, zero)


def gather_dot(rows: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
    """(B, k): <rows[b], table[idx[b, j]]>, for rows (B, d), idx (B, k), table (n, d)."""
    def body(j, out):
        picked = table.at[idx[:, j]].get(mode=_IN)
        return out.at[:, j].set(jnp.sum(rows * picked, axis=-1))

    return lax.fori_loop(0, idx.shape[1], body, jnp.zeros(idx.shape, rows.dtype))


def scatter_rows(coef: jax.Array, idx: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    """(n, d): sum over (b, j) of coef[b, j] * rows[b] added into row idx[b, j]."""
    def body(j, acc):
        return acc.at[idx[:, j]].add(coef[:, j, None] * rows, mode=_IN)

    zero = jnp.zeros((n, rows.shape[1]), jnp.result_type(coef, rows))
    return lax.fori_loop(0, idx.shape[1], body, zero)


def segment_total(coef: jax.Array, idx: jax.Array, n: int) -> jax.Array:
    """(n,): sum of coef[b, j] over the entries with idx[b, j] = i."""
    return jnp.zeros(n, coef.dtype).at[idx.reshape(-1)].add(coef.reshape(-1), mode=_IN)


def _native_or(xla_op, native_op):
    """native_op where the kernels serve this process and take the array operands (float32
    matrices on one CPU device), else xla_op: the same sums either way."""
    def op(*args):
        arrays = [a for a in args if isinstance(a, jax.Array)]
        return (native_op if native_ops.takes(*arrays) else xla_op)(*args)
    return op


_OPS = {False: (gather_sum, gather_dot, scatter_rows),
        True: (_native_or(gather_sum, native_ops.gather_sum),
               _native_or(gather_dot, native_ops.gather_dot),
               _native_or(scatter_rows, native_ops.scatter_rows))}


# ---------------------------------------------------------------- encoder

@partial(jax.custom_vjp, nondiff_argnums=(6,))
def sparse_preacts(values, x, W_enc, b_enc, b_dec, idx, native=False):
    """`values` (B, k), the pre-activations (x - b_dec) @ W_enc.T + b_enc at `idx`, as a
    differentiable function of x, W_enc, b_enc and b_dec whose backward touches only the
    kept entries. `values` itself gets no gradient (it is the forward value)."""
    del x, W_enc, b_enc, b_dec, idx
    return values


def _preacts_fwd(values, x, W_enc, b_enc, b_dec, idx, native):
    return values, (x, W_enc, b_dec, idx)


def _preacts_bwd(native, res, g):
    gather_sum_, _, scatter_rows_ = _OPS[native]
    x, W_enc, b_dec, idx = res
    n = W_enc.shape[0]
    g_b_enc = segment_total(g, idx, n)
    g_W_enc = scatter_rows_(g, idx, x - b_dec, n)
    g_x = gather_sum_(g, idx, W_enc)  # dropped by XLA when nothing asks for it
    g_b_dec = -(g_b_enc @ W_enc)     # = -sum_b g_x[b], without the (B, d) detour
    return (None, g_x, g_W_enc, g_b_enc, g_b_dec, None)


sparse_preacts.defvjp(_preacts_fwd, _preacts_bwd)


def dense_preacts(values, x, W_enc, b_enc, b_dec, idx, native=False):
    """Reference for sparse_preacts: the same values by plain autodiff through the matmul."""
    del values, native
    pre = (x - b_dec) @ W_enc.T + b_enc
    return jnp.take_along_axis(pre, idx, axis=-1)


# ---------------------------------------------------------------- decoder

@partial(jax.custom_vjp, nondiff_argnums=(3,))
def sparse_decode(values, idx, W_dec, native=False):
    """(B, d) = sum_j values[:, j] * W_dec[idx[:, j]] (no bias)."""
    return _OPS[native][0](values, idx, W_dec)


def _decode_fwd(values, idx, W_dec, native):
    return _OPS[native][0](values, idx, W_dec), (values, idx, W_dec)


def _decode_bwd(native, res, g):
    _, gather_dot_, scatter_rows_ = _OPS[native]
    values, idx, W_dec = res
    return gather_dot_(g, idx, W_dec), None, scatter_rows_(values, idx, g, W_dec.shape[0])


sparse_decode.defvjp(_decode_fwd, _decode_bwd)


def dense_decode(values, idx, W_dec, native=False):
    """Reference for sparse_decode: the dense (B, n) code times W_dec."""
    del native
    rows = jnp.arange(idx.shape[0])[:, None]
    code = jnp.zeros((idx.shape[0], W_dec.shape[0]), values.dtype).at[rows, idx].add(values)
    return code @ W_dec
