"""The Matryoshka BatchTopK family (Bussmann et al. 2025; Nabeshima 2025): BatchTopK whose
nested prefixes of latents (the first m_1 < m_2 < ... < n) each reconstruct the input from
their own part of the code; the loss adds the prefixes' FVUs to the whole code's, so that
the first latents learn what matters most. Each prefix's held-out FVU is reported.
Registered as arch "matryoshka"."""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from ksae_jax import checks, losses
from ksae_jax.models.batchtopk import BatchTopKModel, BatchTopKRecipe, BatchTopKSAE, BatchTopKSAEs
from ksae_jax.models.family import LossTerms
from ksae_jax.models.registry import register
from ksae_jax.models.vector import VectorFamily, squared_error


@dataclasses.dataclass(frozen=True)
class MatryoshkaModel(BatchTopKModel):
    """Matryoshka BatchTopK: every prefix of the latents reconstructs the input on its own;
    the losses of the prefixes add up."""

    arch: Literal["matryoshka"] = "matryoshka"
    """The family."""
    prefixes: tuple[int, ...] = ()
    """Sizes of the nested prefixes below latents (latents itself is always the last); ():
    latents / 16, / 4 and / 2."""

    def __post_init__(self):
        super().__post_init__()
        prefixes = tuple(int(p) if checks.is_int(p) else p for p in self.prefixes) or tuple(
            self.latents // f for f in (16, 4, 2) if self.latents // f > 0)
        for p in prefixes:
            checks.positive_int("prefix size", p)
        if list(prefixes) != sorted(set(prefixes)) or prefixes[-1] >= self.latents:
            raise ValueError(f"prefixes must increase strictly and stay below the {self.latents} "
                             f"latents, got {list(prefixes)}")
        object.__setattr__(self, "prefixes", prefixes)


class MatryoshkaOutput(NamedTuple):
    """One forward pass of a Matryoshka SAE: BatchTopK's, and each prefix's error."""

    recon: jax.Array
    """(B, d) reconstruction from the whole code, b_dec included."""
    code: jax.Array
    """(B, n) kept activations (0 elsewhere)."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (AuxK selects from it)."""
    min_kept: jax.Array
    """The smallest kept activation of the batch (moves the threshold)."""
    fvu: jax.Array | None = None
    """FVU of the whole code's reconstruction over the batch's real rows."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""
    prefix_sse: jax.Array | None = None
    """(prefixes,) squared error of each nested prefix's reconstruction."""
    prefix_fvu: jax.Array | None = None
    """(prefixes,) the FVU of each nested prefix of the latents (the whole code excluded)."""


def prefix_reconstructions(code, W_dec, b_dec, prefixes):
    """The reconstruction of each prefix: code[:, :m] @ W_dec[:m] + b_dec, for m in prefixes."""
    return [code[:, :m] @ W_dec[:m] + b_dec for m in prefixes]


class MatryoshkaSAE(BatchTopKSAE):
    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> MatryoshkaOutput:
        out = MatryoshkaOutput(*super().__call__(x, w, hp, max_k, dead=dead, terms=terms))
        inner = prefix_reconstructions(out.code, self.W_dec[...], self.b_dec[...],
                                       self.cfg.prefixes)
        sse = jnp.stack([squared_error(r, x, w) for r in inner])
        if not terms:
            return out._replace(prefix_sse=sse)
        denom = jnp.maximum(losses.total_variance(x, w), 1e-30)
        return out._replace(prefix_sse=sse, prefix_fvu=sse / denom)


class MatryoshkaFamily(VectorFamily):
    """matryoshka: BatchTopK's FVU plus the FVU of every nested prefix."""

    recipe = BatchTopKRecipe()

    def module(self, rngs):
        return MatryoshkaSAE(self.model, rngs=rngs)

    def loss_terms(self, out, hp):
        return LossTerms(out.fvu + jnp.sum(out.prefix_fvu))

    def eval_sums(self, out, x, w):
        return {**super().eval_sums(out, x, w), "prefix_sse": out.prefix_sse}


class MatryoshkaSAEs(BatchTopKSAEs):
    """Matryoshka SAEs for inference (served as BatchTopK's are)."""


register("matryoshka", MatryoshkaModel, MatryoshkaFamily, MatryoshkaSAEs)
