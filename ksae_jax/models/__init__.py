"""The models, by arch: the image k-sparse autoencoders (`conv`, `mlp`) and the TopK SAE on
vectors (`topk`). Each is an NNX module; training and inference use them through pure
functions of a plain params pytree (split once, merged inside jitted code)."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from ksae_jax.config import ModelConfig
from ksae_jax.models import images, sae
from ksae_jax.topk import sparsify

_MODULES = {"conv": images.ConvKSAE, "mlp": images.MlpKSAE, "topk": sae.TopKSAE}


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    return _MODULES[cfg.arch](cfg, rngs=rngs)


def init_params(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh parameters as a plain nested dict of arrays (vmappable over keys)."""
    return nnx.to_pure_dict(nnx.state(build(cfg, nnx.Rngs(params=key)), nnx.Param))


@functools.lru_cache(maxsize=None)
def graphdef(cfg: ModelConfig):
    return nnx.graphdef(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def bind(cfg: ModelConfig, params: dict) -> nnx.Module:
    """The module for `params` (use inside jitted functions of the params pytree)."""
    return nnx.merge(graphdef(cfg), params)


def apply(cfg: ModelConfig, params: dict, x: jax.Array, k, max_k: int):
    """The training forward pass: images.Output or sae.SaeOutput (both have .recon)."""
    return bind(cfg, params)(x, k, max_k)


def encode(cfg: ModelConfig, params: dict, x: jax.Array, k, max_k: int) -> jax.Array:
    """Dense k-sparse codes (B, hidden)."""
    dense, _ = bind(cfg, params).encode_dense(x)
    return sparsify(dense, k, max_k)


def decode(cfg: ModelConfig, params: dict, code: jax.Array) -> jax.Array:
    """Reconstructions from dense codes (B, hidden)."""
    return bind(cfg, params).decode_all(code)[0]
