"""ksae_jax: k-sparse autoencoders in JAX/Flax, every k of a sweep trained in one vmapped run."""
from ksae_jax.config import ModelConfig, SweepConfig
from ksae_jax.inference import Autoencoder, load
from ksae_jax.model import ConvKSAE, MlpKSAE, apply, decode, encode, init_params
from ksae_jax.topk import keep_top_k, sparsify, top_k_mask
from ksae_jax.train import evaluate, init_models, train_step, train_sweep

__all__ = [
    "Autoencoder", "ConvKSAE", "MlpKSAE", "ModelConfig", "SweepConfig", "apply", "decode",
    "encode", "evaluate", "init_models", "init_params", "keep_top_k", "load", "sparsify",
    "top_k_mask", "train_step", "train_sweep",
]
