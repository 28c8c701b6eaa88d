"""The BatchTopK family (Bussmann et al. 2024): in training, the B k largest activations of a
batch of B rows are kept, wherever they fall (a row may keep more or fewer than k); the
smallest kept activation of each batch moves a running threshold (SAELens's estimate, a step
of its recipe), and the trained SAE is served as a JumpReLU with that one threshold:
z = ReLU(pre) where pre > threshold. The sweep's per-model k is traced as for TopK. Codes are
dense (B, n): the kept count of a row is not static. Registered as arch "batchtopk"."""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ksae_jax import checks
from ksae_jax.models.registry import register
from ksae_jax.models.vector import SaeModel, VectorFamily, VectorSAE, VectorSAEModule
from ksae_jax.recipe import VectorRecipe


@dataclasses.dataclass(frozen=True)
class BatchTopKModel(SaeModel):
    """BatchTopK: the top B k activations of a batch of B rows, not k per row; served as a
    JumpReLU with the threshold estimated in training."""

    arch: Literal["batchtopk"] = "batchtopk"
    """The family."""
    threshold_lr: float = 0.01
    """The threshold used at inference moves this fraction of the way to each training
    batch's smallest kept activation (SAELens's running estimate)."""

    def __post_init__(self):
        checks.choice(self, "arch")
        checks.fraction("threshold_lr", self.threshold_lr, low_open=True)
        super().__post_init__()


class BatchTopKOutput(NamedTuple):
    """One forward pass of a BatchTopK SAE."""

    recon: jax.Array
    """(B, d) reconstruction, b_dec included."""
    code: jax.Array
    """(B, n) kept activations (0 elsewhere)."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (AuxK selects from it)."""
    min_kept: jax.Array
    """The smallest kept activation of the batch (moves the threshold)."""
    fvu: jax.Array | None = None
    """Fraction of variance unexplained over the batch's real rows."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""


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


def batch_keep(acts, w, k):
    """Mask of the (real rows x k) largest activations of the batch (ties kept)."""
    real = (w > 0)[:, None]
    count = jnp.sum(w > 0).astype(jnp.int32) * k
    cut = kth_largest(jnp.where(real, acts, -1.0), count)
    return real & (acts >= cut) & (acts > 0)


def moved_threshold(threshold, min_kept, keep, lr: float):
    """The running threshold moved lr of the way to the batch's smallest kept value (it starts
    at the first batch's, where SAELens starts at 0: short runs then serve the threshold they
    trained with, not a fraction of it); unchanged where the update did not apply."""
    seen = jnp.isfinite(min_kept)
    target = jnp.where(seen, min_kept, 0.0)
    moved = jnp.where(threshold > 0, (1 - lr) * threshold + lr * target, target)
    return jnp.where(keep & seen, moved, threshold)


class BatchTopKSAE(VectorSAEModule):
    def __init__(self, cfg: BatchTopKModel, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.threshold = nnx.Param(jnp.zeros((), jnp.float32))  # moved by the recipe only

    def encode_dense(self, x, w, k, terms: bool):
        """(pre, code, min kept): batch top-k in training, the threshold otherwise."""
        pre = self.dense_pre(x)
        acts = jax.nn.relu(pre)
        if terms:
            keep = lax.stop_gradient(batch_keep(lax.stop_gradient(acts), w, k))
        else:
            keep = pre > self.threshold[...]
        code = jnp.where(keep, acts, 0.0)
        min_kept = jnp.min(jnp.where(keep, lax.stop_gradient(acts), jnp.inf))
        return pre, code, min_kept

    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> BatchTopKOutput:
        pre, code, min_kept = self.encode_dense(x, w, hp["k"], terms)
        if not terms:
            return BatchTopKOutput(self.decode_dense(code), code,
                                   lax.stop_gradient(pre - self.b_enc[...]), min_kept)
        recon, selecting, fvu, aux = self.dense_terms(x, w, pre, code, dead)
        return BatchTopKOutput(recon, code, selecting, min_kept, fvu, aux)


class BatchTopKRecipe(VectorRecipe):
    """The vector SAEs' recipe, and the threshold's running estimate after each update."""

    def post_update(self, new, old, keep, out, model):
        """The threshold's running estimate (moved_threshold)."""
        new = super().post_update(new, old, keep, out, model)
        return {**new, "threshold": moved_threshold(old["threshold"], out.min_kept, keep,
                                                    model.threshold_lr)}


class BatchTopKFamily(VectorFamily):
    """batchtopk: FVU of the batch's top B k; threshold inference."""

    recipe = BatchTopKRecipe()

    def module(self, rngs):
        return BatchTopKSAE(self.model, rngs=rngs)


class BatchTopKSAEs(VectorSAE):
    """BatchTopK SAEs for inference: a JumpReLU with the trained threshold (k names the model)."""

    def saelens_view(self, *label, **named):
        """SAELens serves BatchTopK as a JumpReLU with the trained threshold on every latent."""
        return "jumprelu", None, self.params_for(*label, **named)["threshold"]


register("batchtopk", BatchTopKModel, BatchTopKFamily, BatchTopKSAEs)
