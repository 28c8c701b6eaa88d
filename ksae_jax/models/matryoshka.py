"""The Matryoshka BatchTopK family (Bussmann et al. 2025; Nabeshima 2025): BatchTopK whose
nested prefixes of latents (the first m_1 < m_2 < ... < n) each reconstruct the input from
their own part of the code; the loss adds the prefixes' FVUs to the whole code's, so that
the first latents learn what matters most. Each prefix's held-out FVU is reported."""
from __future__ import annotations

import jax.numpy as jnp

from ksae_jax import losses
from ksae_jax.models.batchtopk import (
    BatchTopKFamily,
    BatchTopKSAE,
    BatchTopKSAEs,
    DenseOutput,
)
from ksae_jax.models.sae import squared_error


def prefix_reconstructions(code, W_dec, b_dec, prefixes):
    """The reconstruction of each prefix: code[:, :m] @ W_dec[:m] + b_dec, for m in prefixes."""
    return [code[:, :m] @ W_dec[:m] + b_dec for m in prefixes]


class MatryoshkaSAE(BatchTopKSAE):
    def __call__(self, x, w, k, max_k: int, *, dead=None, aux_k=None, terms=True) -> DenseOutput:
        out = super().__call__(x, w, k, max_k, dead=dead, aux_k=aux_k, terms=terms)
        inner = prefix_reconstructions(out.code, self.W_dec[...], self.b_dec[...],
                                       self.cfg.prefixes)
        sse = jnp.stack([squared_error(r, x, w) for r in inner])
        if not terms:
            return out._replace(prefix_sse=sse)
        denom = jnp.maximum(losses.total_variance(x, w), 1e-30)
        return out._replace(prefix_sse=sse, prefix_fvu=sse / denom)


class MatryoshkaFamily(BatchTopKFamily):
    """matryoshka: BatchTopK's loss plus the FVU of every nested prefix."""

    flags = ("threshold_lr", "prefixes")

    def module(self, rngs):
        return MatryoshkaSAE(self.model, rngs=rngs)

    def extra_loss(self, out):
        return jnp.sum(out.prefix_fvu)

    def eval_sums(self, out, x, w):
        return {**super().eval_sums(out, x, w), "prefix_sse": out.prefix_sse}


class MatryoshkaSAEs(BatchTopKSAEs):
    family_class = MatryoshkaFamily
