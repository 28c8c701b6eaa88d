"""The model families, looked up once from the model config: `family(cfg.model)` gives the
object that says everything about a kind of model (see family.Family). Images: `conv`, `mlp`
(images.ImageFamily); vectors: `topk` (sae.TopKFamily), `batchtopk`, `matryoshka`,
`jumprelu` (their modules)."""
from __future__ import annotations

import functools

from ksae_jax.models.batchtopk import BatchTopKFamily, BatchTopKSAEs
from ksae_jax.models.family import Family
from ksae_jax.models.images import Autoencoder, ImageFamily
from ksae_jax.models.jumprelu import JumpReLUFamily, JumpReLUSAEs
from ksae_jax.models.loaded import Loaded
from ksae_jax.models.matryoshka import MatryoshkaFamily, MatryoshkaSAEs
from ksae_jax.models.sae import TopKFamily, VectorSAE

FAMILIES: dict[str, type[Family]] = {
    "conv": ImageFamily, "mlp": ImageFamily, "topk": TopKFamily, "batchtopk": BatchTopKFamily,
    "matryoshka": MatryoshkaFamily, "jumprelu": JumpReLUFamily}
LOADED: dict[type[Family], type[Loaded]] = {
    ImageFamily: Autoencoder, TopKFamily: VectorSAE, BatchTopKFamily: BatchTopKSAEs,
    MatryoshkaFamily: MatryoshkaSAEs, JumpReLUFamily: JumpReLUSAEs}


@functools.cache
def family(model) -> Family:
    """The family of a model config (ImageModel or SaeModel)."""
    return FAMILIES[model.arch](model)


def loaded(config, ks, params: dict, metrics: dict | None = None,
           input_scale: float = 1.0) -> Loaded:
    """Trained models for inference (Autoencoder, VectorSAE, ...) of a sweep's config."""
    cls = LOADED[type(family(config.model))]
    return cls(config, ks, params, metrics, input_scale)
