"""The JumpReLU family (Rajamanoharan et al. 2024): a threshold per latent, z = pre H(pre -
theta) with theta = exp(log_threshold), trained with straight-through pseudo-gradients for
theta (a rectangle kernel of width `bandwidth`) and an L0 penalty: loss = FVU + l0_coef E[L0].
The sweep goes over l0_coef, a traced per-model array, so one program serves every model;
there is no k. Registered as arch "jumprelu"."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ksae_jax import checks, losses
from ksae_jax.models.family import LossTerms
from ksae_jax.models.registry import register
from ksae_jax.models.vector import SaeModel, VectorFamily, VectorSAE, VectorSAEModule
from ksae_jax.recipe import FIT_ROWS, VectorRecipe


@dataclasses.dataclass(frozen=True)
class JumpReLUModel(SaeModel):
    """JumpReLU: a threshold per latent, z = pre H(pre - theta), trained through
    straight-through estimators with an L0 penalty; the sweep goes over the L0 coefficient
    (SweepConfig.l0_coefs) instead of k."""

    arch: Literal["jumprelu"] = "jumprelu"
    """The family."""
    init_scale: float | Literal["fit"] = 1.0
    """As SaeModel's, but 1 by default ("fit" fits the scale for init_l0 latents per row)."""
    b_enc_init: Literal["zero", "balanced"] = "zero"
    """As SaeModel's, but zero by default (its thresholds start at init_l0, not at a k)."""
    bandwidth: float = 0.05
    """Width of the rectangle kernel of the straight-through pseudo-gradients."""
    init_l0: int | None = None
    """The thresholds start where each latent fires on init_l0 / latents of the training
    rows (None: 64, at most a quarter of the latents)."""
    threshold_lr_scale: float = 10.0
    """The thresholds' learning rate is the SAE's times this (they move L0, and only they
    see the L0 penalty's pseudo-gradient)."""

    sweeps_over: ClassVar[str] = "l0_coefs"
    default_sweep: ClassVar[tuple] = (3e-4, 1e-3, 3e-3, 1e-2)

    def __post_init__(self):
        checks.choice(self, "arch")
        checks.positive("bandwidth", self.bandwidth)
        checks.positive("threshold_lr_scale", self.threshold_lr_scale)
        super().__post_init__()
        if self.init_l0 is None:
            object.__setattr__(self, "init_l0", max(1, min(64, self.latents // 4)))
        checks.check_k(self.init_l0, self.latents, "init_l0")

    def check_labels(self, ks, l0_coefs):
        if ks:
            raise ValueError("JumpReLU has no k: sweep its L0 coefficient (l0_coefs) instead")
        if not l0_coefs:
            raise ValueError("l0_coefs is empty: give at least one L0 coefficient")
        for c in l0_coefs:
            if not (checks.is_number(c) and 0 <= c < math.inf):
                raise ValueError(f"an L0 coefficient must be a number >= 0, got {c!r}")


class JumpReLUOutput(NamedTuple):
    """One forward pass of a JumpReLU SAE."""

    recon: jax.Array
    """(B, d) reconstruction, b_dec included."""
    code: jax.Array
    """(B, n) kept activations: pre where it exceeds its latent's threshold, else 0."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (AuxK selects from it)."""
    fvu: jax.Array | None = None
    """Fraction of variance unexplained over the batch's real rows."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""
    l0: jax.Array | None = None
    """Mean number of kept latents per real row (the penalty, with its pseudo-gradient)."""


def _rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jump_relu(x, theta, bandwidth: float):
    """x H(x - theta): x where it exceeds its latent's threshold, else 0."""
    return jnp.where(x > theta, x, 0.0)


def _jump_fwd(x, theta, bandwidth):
    return jump_relu(x, theta, bandwidth), (x, theta)


def _jump_bwd(bandwidth, res, g):
    x, theta = res
    g_x = jnp.where(x > theta, g, 0.0)  # no pseudo-gradient through x
    g_theta = -(theta / bandwidth) * _rectangle((x - theta) / bandwidth) * g
    return g_x, jnp.sum(g_theta.reshape(-1, theta.shape[-1]), axis=0)


jump_relu.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def heaviside(x, theta, bandwidth: float):
    """H(x - theta), with the straight-through pseudo-gradient -K((x - theta)/eps)/eps in theta."""
    return (x > theta).astype(x.dtype)


def _step_fwd(x, theta, bandwidth):
    return heaviside(x, theta, bandwidth), (x, theta)


def _step_bwd(bandwidth, res, g):
    x, theta = res
    g_theta = -(1.0 / bandwidth) * _rectangle((x - theta) / bandwidth) * g
    return jnp.zeros_like(x), jnp.sum(g_theta.reshape(-1, theta.shape[-1]), axis=0)


heaviside.defvjp(_step_fwd, _step_bwd)


class JumpReLUSAE(VectorSAEModule):
    def __init__(self, cfg: JumpReLUModel, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.log_threshold = nnx.Param(jnp.zeros((cfg.latents,), jnp.float32))  # set from data

    def __call__(self, x, w, hp, max_k=None, *, dead=None, terms=True) -> JumpReLUOutput:
        pre = self.dense_pre(x)
        theta = jnp.exp(self.log_threshold[...])
        code = jump_relu(pre, theta, self.cfg.bandwidth)
        if not terms:
            return JumpReLUOutput(self.decode_dense(code), code,
                                  jax.lax.stop_gradient(pre - self.b_enc[...]))
        l0 = losses.weighted_mean(heaviside(pre, theta, self.cfg.bandwidth).sum(-1), w)
        recon, selecting, fvu, aux = self.dense_terms(x, w, pre, code, dead)
        return JumpReLUOutput(recon, code, selecting, fvu, aux, l0)


class JumpReLURecipe(VectorRecipe):
    """The vector SAEs' recipe, with the thresholds initialised from the data too."""

    def init_ks(self, cfg):
        """A JumpReLU has no k: its scale and b_enc fits take init_l0 latents per row."""
        return (cfg.model.init_l0,) * cfg.n_models

    def init_from_data(self, params, sample, cfg):
        """b_dec and the encoder scale as every vector SAE's; each threshold where its latent
        fires on init_l0 / latents of the sample's first rows."""
        params = super().init_from_data(params, sample, cfg)
        mc = cfg.model
        rows = min(FIT_ROWS, cfg.batch_size)  # no more memory than a training step
        x, valid = sample["x"][:rows], sample["valid"][:rows, None]
        q = 1.0 - mc.init_l0 / mc.latents
        thresholds = [jnp.nanquantile(jnp.where(valid, (x - params["b_dec"][m]) @ params["W_enc"][m].T
                                                + params["b_enc"][m], jnp.nan), q, axis=0)
                      for m in range(cfg.n_models)]
        floor = 1e-3 * jnp.sqrt(jnp.sum(jnp.where(valid, x - jnp.mean(x, 0), 0) ** 2)
                                / jnp.maximum(jnp.sum(valid) * x.shape[1], 1))
        return {**params, "log_threshold": jnp.log(jnp.maximum(jnp.stack(thresholds), floor))}


class JumpReLUFamily(VectorFamily):
    """jumprelu: FVU + l0_coef * L0; thresholds learnt per latent."""

    recipe = JumpReLURecipe()

    def module(self, rngs):
        return JumpReLUSAE(self.model, rngs=rngs)

    @property
    def lr_scales(self):
        return {"log_threshold": self.model.threshold_lr_scale}

    def hyperparameters(self, cfg):
        return {"l0_coef": np.asarray(cfg.per_model(cfg.l0_coefs), np.float32)}

    def loss_terms(self, out, hp):
        return LossTerms(out.fvu, hp["l0_coef"] * out.l0)


class JumpReLUSAEs(VectorSAE):
    """JumpReLU SAEs for inference: each model is named by its L0 coefficient."""

    def saelens_view(self, *label, **named):
        return "jumprelu", None, np.exp(self.params_for(*label, **named)["log_threshold"])


register("jumprelu", JumpReLUModel, JumpReLUFamily, JumpReLUSAEs)
