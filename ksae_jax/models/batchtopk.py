"""The BatchTopK family (Bussmann et al. 2024): in training, the B k largest activations of a
batch of B rows are kept, wherever they fall (a row may keep more or fewer than k); the
smallest kept activation of each batch moves a running threshold (SAELens's estimate), and
the trained SAE is served as a JumpReLU with that one threshold: z = ReLU(pre) where
pre > threshold. The sweep's per-model k is traced as for TopK. Codes are dense (B, n):
the kept count of a row is not static."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ksae_jax import losses
from ksae_jax.config import BatchTopKModel
from ksae_jax.models.layers import matmul
from ksae_jax.models.sae import TopKFamily, TopKSAE, VectorSAE, squared_error


class DenseOutput(NamedTuple):
    """One forward pass of an SAE with dense codes (BatchTopK, Matryoshka, JumpReLU)."""

    recon: jax.Array
    """(B, d) reconstruction, b_dec included."""
    code: jax.Array
    """(B, n) kept activations (0 elsewhere)."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (AuxK selects from it)."""
    fvu: jax.Array | None = None
    """Fraction of variance unexplained over the batch's real rows."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""
    min_kept: jax.Array | None = None
    """BatchTopK: the smallest kept activation of the batch (moves the threshold)."""
    prefix_sse: jax.Array | None = None
    """Matryoshka: (prefixes,) squared error of each nested prefix's reconstruction."""
    prefix_fvu: jax.Array | None = None
    """Matryoshka: the FVU of each nested prefix of the latents (the whole code excluded)."""
    l0: jax.Array | None = None
    """Mean number of kept latents per real row (JumpReLU's penalty)."""


def kth_largest(values: jax.Array, count) -> jax.Array:
    """The count-th largest of the non-negative `values` (negative entries never count),
    exactly: a bisection over float32 bit patterns, whose order is the order of the
    non-negative floats. count may be traced; values of any shape."""
    bits = lax.bitcast_convert_type(values.astype(jnp.float32), jnp.int32)

    def halve(_, bounds):
        lo, hi = bounds  # the answer's bits lie in [lo, hi]
        mid = lo + (hi - lo + 1) // 2
        enough = jnp.sum(bits >= mid) >= count
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    lo, _ = lax.fori_loop(0, 32, halve, (jnp.int32(0), jnp.int32(0x7F800000)))
    return lax.bitcast_convert_type(lo, jnp.float32)


class BatchTopKSAE(TopKSAE):
    def __init__(self, cfg: BatchTopKModel, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.threshold = nnx.Param(jnp.zeros((), jnp.float32))  # moved by post_update only

    def batch_keep(self, acts, w, k):
        """Mask of the (real rows x k) largest activations of the batch (ties kept)."""
        real = (w > 0)[:, None]
        count = jnp.sum(w > 0).astype(jnp.int32) * k
        cut = kth_largest(jnp.where(real, acts, -1.0), count)
        return real & (acts >= cut) & (acts > 0)

    def encode_dense(self, x, w, k, terms: bool):
        """(pre, code, min kept): batch top-k in training, the threshold otherwise."""
        pre = self.dense_pre(x)
        acts = jax.nn.relu(pre)
        if terms:
            keep = lax.stop_gradient(self.batch_keep(lax.stop_gradient(acts), w, k))
        else:
            keep = pre > self.threshold[...]
        code = jnp.where(keep, acts, 0.0)
        min_kept = jnp.min(jnp.where(keep, lax.stop_gradient(acts), jnp.inf))
        return pre, code, min_kept

    def __call__(self, x, w, k, max_k: int, *, dead=None, aux_k=None, terms=True) -> DenseOutput:
        pre, code, min_kept = self.encode_dense(x, w, k, terms)
        return dense_output(self, x, w, pre, code, terms, dead, aux_k, min_kept=min_kept)


def dense_output(sae: TopKSAE, x, w, pre, code, terms: bool, dead, aux_k, **fields) -> DenseOutput:
    """The dense-code families' forward from their (B, n) pre-activations and code: decode,
    and with terms the FVU, the family's own `fields` and AuxK over the `dead` latents."""
    recon = matmul(code, sae.W_dec[...], sae.cfg.dtype) + sae.b_dec[...]
    selecting = lax.stop_gradient(pre - sae.b_enc[...])
    out = DenseOutput(recon, code, selecting)
    if not terms:
        return out
    denom = losses.total_variance(x, w)
    out = out._replace(fvu=losses.fvu(recon, x, w, denom), **fields)
    if dead is not None:
        out = out._replace(auxk=sae.auxk(selecting, x, w, recon, dead, aux_k, denom, True))
    return out


class DenseCodeFamily(TopKFamily):
    """What the dense-code SAE families share: evaluation, codes and usage from (B, n) codes."""

    def eval_sums(self, out, x, w):
        counts = jnp.sum((out.code > 0) * w[:, None], axis=0)
        return {"sse": squared_error(out.recon, x, w), "counts": counts}

    def code(self, out):
        return out.code

    def usage(self, out, k, max_k):
        return jnp.sum(out.code > 0, axis=0).astype(jnp.float32)

    def fired(self, out, w):
        return jnp.any((out.code > 0) & (w[:, None] > 0), axis=0)


class BatchTopKFamily(DenseCodeFamily):
    """batchtopk: FVU (+ aux_coef * AuxK) of the batch's top B k; threshold inference."""

    flags = ("threshold_lr",)

    def module(self, rngs):
        return BatchTopKSAE(self.model, rngs=rngs)

    def loss(self, params, batch, hp, dead, *, cfg, max_k):
        x, w = batch["x"], batch["w"]
        out = self.forward(params, x, w, hp["k"], max_k, dead=dead if cfg.aux_coef else None,
                           aux_k=cfg.aux_k)
        loss = out.fvu + self.extra_loss(out)
        if cfg.aux_coef:
            loss += cfg.aux_coef * out.auxk
        return loss, {"loss": loss, "rec": out.fvu, "fired": self.fired(out, w),
                      "min_kept": out.min_kept}

    def extra_loss(self, out):
        return 0.0

    def post_update(self, new, old, keep, metrics):
        """The threshold moves threshold_lr of the way to the batch's smallest kept value
        (it starts at the first batch's, where SAELens starts at 0: short runs then serve
        the threshold they trained with, not a fraction of it)."""
        new = super().post_update(new, old, keep, metrics)
        lr, seen = self.model.threshold_lr, jnp.isfinite(metrics["min_kept"])
        target = jnp.where(seen, metrics["min_kept"], 0.0)
        moved = jnp.where(old["threshold"] > 0, (1 - lr) * old["threshold"] + lr * target, target)
        return {**new, "threshold": jnp.where(keep & seen, moved, old["threshold"])}


class BatchTopKSAEs(VectorSAE):
    """BatchTopK SAEs for inference: a JumpReLU with the trained threshold (k names the model)."""

    family_class = BatchTopKFamily

    def saelens_view(self, k=None):
        """SAELens serves BatchTopK as a JumpReLU with the trained threshold on every latent."""
        return "jumprelu", None, self.params_for(k)["threshold"]
