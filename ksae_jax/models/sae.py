"""The TopK sparse autoencoder on vectors (Gao et al. 2024) as a Flax NNX module:
z = ReLU(TopK(W_enc (x - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec.

W_enc and W_dec are both stored (n, d), one row per latent (sparsify's layout), so the sparse
paths move whole rows. The decoder rows start as random unit vectors and W_enc equals W_dec;
b_dec is set from the data (geometric median) by the training loop.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ksae_jax import sparse_ops
from ksae_jax.config import ModelConfig
from ksae_jax.topk import top_k

SPARSE_MAX_DENSITY = 1 / 16  # "auto": sparse paths while k / n is below this


class SaeOutput(NamedTuple):
    recon: jax.Array    # (B, d)
    values: jax.Array   # (B, K) kept activations (after ReLU; 0 beyond each model's k)
    indices: jax.Array  # (B, K) their latents
    pre: jax.Array      # (B, n) encoder matmul without b_enc, without gradient (selection)


def use_sparse(cfg: ModelConfig, k: int) -> bool:
    """Whether the custom-VJP paths serve this model: forced by cfg.decoder, else while
    k / n is small enough that gathers and scatters beat dense products."""
    if cfg.decoder != "auto":
        return cfg.decoder == "sparse"
    return k <= SPARSE_MAX_DENSITY * cfg.hidden


class TopKSAE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        rows = jax.random.normal(rngs.params(), (cfg.hidden, cfg.d_in), jnp.float32)
        rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
        self.W_enc = nnx.Param(rows)
        self.b_enc = nnx.Param(jnp.zeros((cfg.hidden,), jnp.float32))
        self.W_dec = nnx.Param(rows)
        self.b_dec = nnx.Param(jnp.zeros((cfg.d_in,), jnp.float32))
        self.cfg = cfg

    def preacts(self, x):
        """(B, n) encoder matmul (x - b_dec) W_enc^T, b_enc not added (top_k adds it on the
        fly), as a constant: it selects; the kept values get their gradient from
        `kept_values`."""
        W, b_dec = lax.stop_gradient((self.W_enc[...], self.b_dec[...]))
        return (x - b_dec) @ W.T

    def select(self, pre, k: int, dead=None):
        """(values, indices) of the k largest pre-activations pre + b_enc of each row, among
        the `dead` latents only when a mask is given."""
        bias = lax.stop_gradient(self.b_enc[...])
        if dead is not None:
            bias = jnp.where(dead, bias, -jnp.inf)
        return top_k(pre, k, bias)

    def kept_values(self, values, x, idx, sparse: bool):
        """Pre-activations at idx, differentiable in the encoder (sparse or dense backward)."""
        fn = sparse_ops.sparse_preacts if sparse else sparse_ops.dense_preacts
        return fn(lax.stop_gradient(values), x, self.W_enc[...], self.b_enc[...],
                  self.b_dec[...], idx)

    def decode_sparse(self, values, idx, sparse: bool):
        """sum_j values[:, j] W_dec[idx[:, j]], without b_dec."""
        fn = sparse_ops.sparse_decode if sparse else sparse_ops.dense_decode
        return fn(values, idx, self.W_dec[...])

    def __call__(self, x, k, max_k: int) -> SaeOutput:
        """Forward pass keeping max_k latents per vector, of which the first k (traced)."""
        sparse = use_sparse(self.cfg, max_k)
        pre = self.preacts(x)
        top, idx = self.select(pre, max_k)
        values = jax.nn.relu(self.kept_values(top, x, idx, sparse))
        values = jnp.where(jnp.arange(max_k) < k, values, 0.0)
        recon = self.decode_sparse(values, idx, sparse) + self.b_dec[...]
        return SaeOutput(recon, values, idx, pre)

    # the interface every model shares (dense codes), for inference, classifiers and figures
    def encode_dense(self, x):
        """ReLU of the pre-activations (its top k equal ReLU(TopK(pre)))."""
        return jax.nn.relu((x - self.b_dec[...]) @ self.W_enc[...].T + self.b_enc[...]), ()

    def decode_all(self, code):
        recon = code @ self.W_dec[...] + self.b_dec[...]
        return recon, recon, ()
