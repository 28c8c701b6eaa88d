"""The model families, each one file that registers its config, its Family (the maths) and
its inference class: `images` (arch conv, mlp), `topk`, `batchtopk`, `matryoshka`,
`jumprelu`, `transcoder` (arch transcoder, skip-transcoder), `clt` (cross-layer transcoders); `vector` holds what the SAEs on vectors share, `family` the interface, `loaded`
inference, `registry` the lookup: `family(cfg.model)` gives a model config's Family."""
from __future__ import annotations

from ksae_jax.models import (batchtopk, clt, images, jumprelu, matryoshka,  # noqa: F401
                             topk, transcoder)
from ksae_jax.models.family import Family, LossTerms, ModelConfig
from ksae_jax.models.images import Autoencoder, ImageModel
from ksae_jax.models.loaded import Loaded
from ksae_jax.models.registry import archs, family, loaded, lookup, register
from ksae_jax.models.vector import SaeModel, VectorSAE

__all__ = ["Autoencoder", "Family", "ImageModel", "Loaded", "LossTerms", "ModelConfig",
           "SaeModel", "VectorSAE", "archs", "family", "loaded", "lookup", "register"]
