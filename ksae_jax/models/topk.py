"""The TopK family: sparse autoencoders of vectors (Gao et al. 2024),
z = ReLU(TopK(W_enc (x - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec: its config (the
decoder's path and Multi-TopK), its one forward pass (reconstruction, kept latents, FVU,
Multi-TopK and AuxK terms) on sparse (B, k) codes, and `TopKSAEs` for inference. The
recipe around the update is the vector SAEs' (ksae_jax.recipe.VectorRecipe). Registered as
arch "topk"."""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import checks, losses, native_ops
from ksae_jax.models.family import LossTerms
from ksae_jax.models.loaded import CHUNK, forward_jit
from ksae_jax.models.registry import register
from ksae_jax.models.vector import SaeModel, VectorFamily, VectorSAE, VectorSAEModule, squared_error

SPARSE_MAX_DENSITY = 1 / 16  # "auto": sparse paths while k / n is below this
MULTI_TOPK_FACTOR, MULTI_TOPK_WEIGHT = 4, 1 / 8


@dataclasses.dataclass(frozen=True)
class TopKModel(SaeModel):
    """A TopK sparse autoencoder: each vector keeps its k largest latents."""

    arch: Literal["topk"] = "topk"
    """The family."""
    decoder: Literal["auto", "native", "sparse", "dense"] = "auto"
    """"sparse" (custom-VJP gather/scatter paths on XLA ops), "native" (the same on native_ops'
    CPU kernels), "dense" (plain autodiff) or "auto" (dense for large k / n, else native
    where the kernels serve the process, else sparse)."""
    multi_topk: bool = False
    """Add the FVU of the top 4k latents' reconstruction (weight 1/8), as Gao et al."""

    def __post_init__(self):
        checks.choice(self, "arch", "decoder")
        super().__post_init__()

    def check_runnable(self) -> None:
        if self.decoder == "native" and (why := native_ops.unavailable()):
            raise ValueError(f"decoder 'native': {why}")

    def check_labels(self, ks, l0_coefs):
        super().check_labels(ks, l0_coefs)
        for k in ks if self.multi_topk else ():
            if MULTI_TOPK_FACTOR * k > self.latents:
                raise ValueError(f"multi_topk needs 4k <= latents; k={k} gives "
                                 f"{MULTI_TOPK_FACTOR * k} > {self.latents}")


class SaeOutput(NamedTuple):
    """One forward pass of a TopK SAE on a batch (sparsify's ForwardOutput, in JAX)."""

    recon: jax.Array
    """(B, d) reconstruction, b_dec included."""
    values: jax.Array
    """(B, K) kept activations after ReLU (0 beyond the model's k)."""
    indices: jax.Array
    """(B, K) the latents they belong to."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (it selects the latents)."""
    fvu: jax.Array | None = None
    """Fraction of variance unexplained over the batch's real rows."""
    multi_topk_fvu: jax.Array | None = None
    """FVU of the reconstruction from the top 4k latents (Multi-TopK; None when off)."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""


def sparse_path(cfg: TopKModel, k: int) -> str:
    """How this model's gathers and scatters run: "dense" (plain products), "sparse" (the
    custom VJPs on XLA ops) or "native" (the same on native_ops' CPU kernels). cfg.decoder
    forces one; "auto" takes dense while k / n is too large for gathers and scatters to win,
    else native where the kernels serve this process, else sparse."""
    if cfg.decoder == "native" and (why := native_ops.unavailable()):
        raise ValueError(f"decoder 'native': {why}")
    if cfg.decoder != "auto":
        return cfg.decoder
    if k > SPARSE_MAX_DENSITY * cfg.latents:
        return "dense"
    return "sparse" if native_ops.unavailable() else "native"


class TopKSAE(VectorSAEModule):
    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> SaeOutput:
        """Keeps max_k latents per vector, of which the first hp["k"] (traced); with terms,
        the top 4 max_k for Multi-TopK when the model has it, and AuxK when `dead` is given."""
        k = hp["k"]
        multi = self.cfg.multi_topk and terms
        width = max_k * (MULTI_TOPK_FACTOR if multi else 1)
        path = sparse_path(self.cfg, width)
        pre = self.preacts(x)
        top, idx = self.select(pre, width, path=path)
        values = jax.nn.relu(self.kept_values(top, x, idx, path))
        rank = jnp.arange(width)
        main = jnp.where(rank[:max_k] < k, values[:, :max_k], 0.0)
        recon = self.decode_sparse(main, idx[:, :max_k], path) + self.b_dec[...]
        out = SaeOutput(recon, main, idx[:, :max_k], pre)
        if not terms:
            return out
        denom = losses.total_variance(x, w)
        out = out._replace(fvu=losses.fvu(recon, x, w, denom))
        if multi:
            kept = jnp.where(rank < MULTI_TOPK_FACTOR * k, values, 0.0)
            out = out._replace(multi_topk_fvu=losses.fvu(
                self.decode_sparse(kept, idx, path) + self.b_dec[...], x, w, denom))
        if dead is not None:
            out = out._replace(auxk=self.auxk(pre, x, w, recon, dead, denom, path))
        return out


class TopKFamily(VectorFamily):
    """topk: FVU (+ Multi-TopK / 8) of each vector's k largest latents; sparse codes."""

    def module(self, rngs):
        return TopKSAE(self.model, rngs=rngs)

    def loss_terms(self, out, hp):
        if out.multi_topk_fvu is None:
            return LossTerms(out.fvu)
        return LossTerms(out.fvu + MULTI_TOPK_WEIGHT * out.multi_topk_fvu)

    def fired(self, out, w):
        """(n,) bool: latents with a positive kept value on a real row of the batch."""
        return losses.fired_units(out.indices, out.values, w, self.model.latents)

    def eval_sums(self, out, x, w):
        on = (out.values > 0) * w[:, None]
        counts = jnp.zeros(self.model.latents).at[out.indices.reshape(-1)].add(on.reshape(-1))
        return {"sse": squared_error(out.recon, x, w), "counts": counts}

    def code(self, out):
        rows = jnp.arange(out.indices.shape[0])[:, None]
        return jnp.zeros((out.indices.shape[0], self.model.latents),
                         out.values.dtype).at[rows, out.indices].add(out.values)

    def usage(self, out, hp, max_k):
        member = jnp.broadcast_to(jnp.arange(max_k) < hp["k"], out.indices.shape)
        return jnp.zeros(self.model.latents).at[out.indices.reshape(-1)].add(member.reshape(-1))


class TopKSAEs(VectorSAE):
    """TopK SAEs for inference: each model is named by its k."""

    def encode_topk(self, x, *label, **named) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices), each (N, k): the kept latents of every vector."""
        i = self.index(*label, **named)
        x, (hp, k) = self._inputs(x), self.hp(i)
        if len(x) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        outs = [forward_jit(self._params(i), x[j:j + CHUNK], hp, family=self.family, max_k=k)
                for j in range(0, len(x), CHUNK)]
        return (np.concatenate([np.asarray(o.values) for o in outs]),
                np.concatenate([np.asarray(o.indices) for o in outs]))

    def saelens_view(self, *label, **named):
        return "topk", self.ks[self.index(*label, **named)], None

    def sparsify_fields(self) -> dict:
        return {"normalize_decoder": True, "multi_topk": self.model_config.multi_topk,
                "transcode": False}


register("topk", TopKModel, TopKFamily, TopKSAEs)
