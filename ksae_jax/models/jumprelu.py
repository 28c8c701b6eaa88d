"""The JumpReLU family (Rajamanoharan et al. 2024): a threshold per latent, z = pre H(pre -
theta) with theta = exp(log_threshold), trained with straight-through pseudo-gradients for
theta (a rectangle kernel of width `bandwidth`) and an L0 penalty: loss = FVU + l0_coef E[L0].
The sweep goes over l0_coef, a traced per-model array, so one program serves every model."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ksae_jax import losses
from ksae_jax.config import JumpReLUModel
from ksae_jax.models.batchtopk import DenseCodeFamily, DenseOutput, dense_output
from ksae_jax.models.sae import FIT_ROWS, TopKSAE, VectorSAE


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


class JumpReLUSAE(TopKSAE):
    def __init__(self, cfg: JumpReLUModel, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.log_threshold = nnx.Param(jnp.zeros((cfg.hidden,), jnp.float32))  # set from data

    def __call__(self, x, w, k, max_k: int, *, dead=None, aux_k=None, terms=True) -> DenseOutput:
        pre = self.dense_pre(x)
        theta = jnp.exp(self.log_threshold[...])
        code = jump_relu(pre, theta, self.cfg.bandwidth)
        l0 = None if not terms else losses.weighted_mean(
            heaviside(pre, theta, self.cfg.bandwidth).sum(-1), w)
        return dense_output(self, x, w, pre, code, terms, dead, aux_k, l0=l0)


class JumpReLUFamily(DenseCodeFamily):
    """jumprelu: FVU + l0_coef * L0 (+ aux_coef * AuxK); thresholds learnt per latent."""

    flags = ("bandwidth", "init_l0")
    sweeps_over = "l0_coefs"
    default_sweep = (3e-4, 1e-3, 3e-3, 1e-2)

    def module(self, rngs):
        return JumpReLUSAE(self.model, rngs=rngs)

    @property
    def lr_scales(self):
        return {"log_threshold": self.model.threshold_lr_scale}

    def hyperparameters(self, cfg):
        return {"l0_coef": np.asarray(cfg.l0_coefs, np.float32)}

    def init_from_data(self, params, sample, cfg):
        """b_dec and the encoder scale as TopK's; each threshold where its latent fires on
        init_l0 / hidden of the sample's first rows."""
        params = super().init_from_data(params, sample, cfg)
        rows = min(FIT_ROWS, cfg.batch_size)  # no more memory than a training step
        x, valid = sample["x"][:rows], sample["valid"][:rows, None]
        q = 1.0 - self.model.init_l0 / self.model.hidden
        thresholds = [jnp.nanquantile(jnp.where(valid, (x - params["b_dec"][m]) @ params["W_enc"][m].T
                                                + params["b_enc"][m], jnp.nan), q, axis=0)
                      for m in range(cfg.n_models)]
        floor = 1e-3 * jnp.sqrt(jnp.sum(jnp.where(valid, x - jnp.mean(x, 0), 0) ** 2)
                                / jnp.maximum(jnp.sum(valid) * x.shape[1], 1))
        return {**params, "log_threshold": jnp.log(jnp.maximum(jnp.stack(thresholds), floor))}

    def loss(self, params, batch, hp, dead, *, cfg, max_k):
        x, w = batch["x"], batch["w"]
        out = self.forward(params, x, w, hp["k"], max_k, dead=dead if cfg.aux_coef else None,
                           aux_k=cfg.aux_k)
        loss = out.fvu + hp["l0_coef"] * out.l0
        if cfg.aux_coef:
            loss += cfg.aux_coef * out.auxk
        return loss, {"loss": loss, "rec": out.fvu, "fired": self.fired(out, w)}


class JumpReLUSAEs(VectorSAE):
    """JumpReLU SAEs for inference: each model is named by its L0 coefficient."""

    family_class = JumpReLUFamily

    def saelens_view(self, k=None):
        return "jumprelu", None, np.exp(self.params_for(k)["log_threshold"])
