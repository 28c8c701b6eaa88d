"""Trained models read back from a params file (or a safetensors export, or a sparsify or
SAELens folder): `load` checks everything a file holds and gives the family's inference class
(Autoencoder for images, the SAE families' for vectors) with encode, decode and reconstruct."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import jax
import numpy as np

from ksae_jax import models
from ksae_jax.checks import is_int
from ksae_jax.config import SweepConfig
from ksae_jax.formats import read_config, read_payload
from ksae_jax.models import Autoencoder, Loaded, VectorSAE
from ksae_jax.models.images import as_images
from ksae_jax.safe_pickle import ParamsFileError

__all__ = ["Autoencoder", "Loaded", "VectorSAE", "as_images", "check_payload", "load"]


def _bad(path, msg: str):
    raise ParamsFileError(f"{path}: {msg}")


def check_payload(path, config: SweepConfig, ks, params) -> dict:
    """The params of a file checked against its config: ks distinct positive ints <= latents
    equal to config.ks; arrays of the configured models' shapes, float32 (float64 is cast
    with a warning), finite."""
    if not isinstance(ks, (list, tuple)) or not all(is_int(k) for k in ks):
        _bad(path, f"'ks' must be a list of integers, got {ks!r}"[:300])
    ks = [int(k) for k in ks]
    if len(set(ks)) != len(ks) or any(k <= 0 or k > config.model.latents for k in ks):
        _bad(path, f"'ks' must be distinct integers in 1..{config.model.latents}, got {ks}")
    if tuple(ks) != config.ks:
        _bad(path, f"'ks' {ks} are not the config's ks {list(config.ks)}")
    expected = jax.eval_shape(config.family.init, jax.random.key(0))
    want = jax.tree.map(lambda s: (config.n_models,) + s.shape, expected)
    try:
        got = jax.tree.map(np.shape, params)
    except Exception:  # noqa: BLE001 - any structural surprise is a bad file
        got = None
    if got != want:
        _bad(path, f"parameters do not match the config's {config.model.arch} model with "
                   f"{config.n_models} models")

    def clean(keypath, a):
        name = "params" + jax.tree_util.keystr(keypath)
        a = np.asarray(a)
        if a.dtype == np.float64:
            warnings.warn(f"{path}: {name} is float64; cast to float32", stacklevel=3)
            a = a.astype(np.float32)
        if a.dtype != np.float32:
            _bad(path, f"{name} has dtype {a.dtype}; expected float32")
        if not np.isfinite(a).all():
            _bad(path, f"{name} holds NaN or Inf")
        return a

    return jax.tree_util.tree_map_with_path(clean, params)


def load(path: str | os.PathLike) -> Loaded:
    """Reads a params.pkl written by ksae_jax (or a folder from export_safetensors); never
    executes code from the file; refuses anything that is not a consistent set of models."""
    path = Path(path)
    payload = read_payload(path)
    try:
        config = read_config(payload["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ParamsFileError(f"{path}: invalid config: {e}") from None
    params = check_payload(path, config, payload["ks"], payload["params"])
    scale = payload.get("input_scale", 1.0)
    if not (isinstance(scale, float) and 0 < scale < np.inf):
        _bad(path, f"input_scale must be a positive float, got {scale!r}")
    metrics = payload.get("metrics")
    return models.loaded(config, params, metrics if isinstance(metrics, dict) else {}, scale)
