"""ksae_jax: k-sparse autoencoders in JAX/Flax, every k of a sweep trained in one compiled run,
for 28x28 images (the original conv network, Makhzani & Frey's MLP) and for any vectors
(TopK sparse autoencoders).

    result = ksae_jax.train_sweep(config, train, test)   # every k in one compiled run
    result.save("runs/x")                                # params.pkl
    model = ksae_jax.load("runs/x/params.pkl")           # encode / decode / reconstruct
"""
from ksae_jax.config import ImageModel, SaeModel, SweepConfig, sae_config
from ksae_jax.export import export_saelens, export_safetensors, export_sparsify
from ksae_jax.inference import Autoencoder, VectorSAE, load
from ksae_jax.topk import keep_top_k
from ksae_jax.train import SweepResult, prepare, train_sweep

__all__ = [
    "Autoencoder", "ImageModel", "SaeModel", "SweepConfig", "SweepResult", "VectorSAE",
    "export_saelens", "export_safetensors", "export_sparsify", "keep_top_k", "load", "prepare", "sae_config",
    "train_sweep",
]
