"""ksae_jax: k-sparse autoencoders in JAX/Flax, every k of a sweep trained in one compiled run,
for 28x28 images (the original conv network, Makhzani & Frey's MLP) and for any vectors
(TopK sparse autoencoders).

    result = ksae_jax.train_sweep(config, train, test)   # every k in one compiled run
    result.save("runs/x")                                # params.pkl
    model = ksae_jax.load("runs/x/params.pkl")           # encode / decode / reconstruct
"""
from ksae_jax.config import (
    BatchTopKModel,
    Execution,
    ImageModel,
    JumpReLUModel,
    MatryoshkaModel,
    Optimizer,
    SaeModel,
    SweepConfig,
    TopKModel,
    sae_config,
)
from ksae_jax.export import export_saelens, export_safetensors, export_sparsify
from ksae_jax.inference import Autoencoder, VectorSAE, load
from ksae_jax.models import register
from ksae_jax.topk import keep_top_k
from ksae_jax.train import SweepResult, prepare, train_sweep

__all__ = [
    "Autoencoder", "BatchTopKModel", "Execution", "ImageModel", "JumpReLUModel",
    "MatryoshkaModel", "Optimizer", "SaeModel", "SweepConfig", "SweepResult", "TopKModel",
    "VectorSAE", "export_saelens", "export_safetensors", "export_sparsify", "keep_top_k", "load",
    "prepare", "register", "sae_config", "train_sweep",
]
