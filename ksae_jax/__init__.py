"""ksae_jax: k-sparse autoencoders in JAX/Flax, every k of a sweep trained in one compiled run,
for 28x28 images (the original conv network, Makhzani & Frey's MLP) and for any vectors
(TopK sparse autoencoders)."""
from ksae_jax.config import ModelConfig, SweepConfig, sae_config
from ksae_jax.export import export_safetensors, export_sparsify
from ksae_jax.inference import Autoencoder, VectorSAE, load
from ksae_jax.models import apply, decode, encode, init_params
from ksae_jax.topk import keep_top_k, sparsify, top_k, top_k_mask
from ksae_jax.train import init_state, train_step, train_sweep

__all__ = [
    "Autoencoder", "ModelConfig", "SweepConfig", "VectorSAE", "apply", "decode", "encode",
    "export_safetensors", "export_sparsify", "init_params", "init_state", "keep_top_k", "load",
    "sae_config", "sparsify", "top_k", "top_k_mask", "train_step", "train_sweep",
]
