"""Trained models read back from a params file: encode, decode and reconstruct new images."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import model
from ksae_jax.checkpoint import ParamsFileError, load_params_file
from ksae_jax.config import SweepConfig, check_k
from ksae_jax.topk import top_k_mask

_CHUNK = 2000  # images per jitted call: bounds activation memory for large inputs


def as_images(images, name: str = "images") -> np.ndarray:
    """(N, 28, 28) float32 in [0, 1] from uint8 pixels or floats; one image may omit N."""
    a = np.asarray(images)
    if a.shape == model.IMAGE_SHAPE:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != model.IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape (N, 28, 28) or (28, 28), got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.floating):
        return a.astype(np.float32)
    raise ValueError(f"{name} must be uint8 pixels (0..255) or floats in [0, 1], got dtype {a.dtype}")


@functools.partial(jax.jit, static_argnames=("cfg", "max_k"))
def _encode(params, x, k, *, cfg, max_k):
    return model.encode(cfg, params, x, k, max_k)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode(params, code, *, cfg):
    return model.decode(cfg, params, code)


@functools.partial(jax.jit, static_argnames=("cfg", "max_k"))
def _unit_counts(params, x, k, *, cfg, max_k):
    dense, _ = model.bind(cfg, params).encode_dense(x)
    return top_k_mask(dense, k, max_k).sum(axis=0)


def _chunked(fn, x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + _CHUNK])) for i in range(0, len(x), _CHUNK)])


class Autoencoder:
    """The models of one sweep (one per k), as numpy params with their config."""

    def __init__(self, config: SweepConfig, ks, params: dict, metrics: dict | None = None):
        self.config = config
        self.ks = tuple(int(k) for k in ks)
        self.params = params
        self.metrics = metrics or {}

    @property
    def model_config(self) -> model.ModelConfig:
        return self.config.model

    def params_for(self, k: int) -> dict:
        """The parameters of the model trained with this k."""
        if k not in self.ks:
            raise ValueError(f"no model for k={k!r} in this file; it holds ks {list(self.ks)}")
        i = self.ks.index(k)
        return jax.tree.map(lambda a: a[i], self.params)

    def encode(self, images, k: int, n_active: int | None = None) -> np.ndarray:
        """k-sparse codes (N, hidden) of images with the model of k.

        n_active: units kept (default k); e.g. 3 * k for classification features.
        """
        p = self.params_for(k)
        n_active = k if n_active is None else check_k(n_active, self.model_config.hidden)
        x = as_images(images)
        fn = functools.partial(_encode, p, k=jnp.int32(n_active), cfg=self.model_config,
                               max_k=n_active)
        return _chunked(fn, x)

    def decode(self, code, k: int) -> np.ndarray:
        """Images (N, 28, 28) from codes (N, hidden) with the decoder of the model of k."""
        p = self.params_for(k)
        c = np.asarray(code, dtype=np.float32)
        hidden = self.model_config.hidden
        if c.ndim != 2 or c.shape[1] != hidden:
            raise ValueError(f"code must have shape (N, {hidden}), got {np.shape(code)}")
        return _chunked(functools.partial(_decode, p, cfg=self.model_config), c)

    def reconstruct(self, images, k: int) -> np.ndarray:
        return self.decode(self.encode(images, k), k)

    def unit_usage(self, images, k: int) -> np.ndarray:
        """For each code unit, on how many of `images` it is among the top k (0: dead)."""
        p, x = self.params_for(k), as_images(images)
        return sum(np.asarray(_unit_counts(p, x[i:i + _CHUNK], jnp.int32(k), cfg=self.model_config,
                                           max_k=k)) for i in range(0, len(x), _CHUNK))

    def decoder_features(self, images, k: int, n: int = 100):
        """What each of the n most used units draws alone: decode(a e_j) - decode(0).

        a is the unit's mean active value on `images`. Returns (features (n, 28, 28),
        unit indices, usage counts of all units).
        """
        code = self.encode(images, k)
        counts = self.unit_usage(images, k)
        units = np.argsort(-counts, kind="stable")[:n]
        active = (code != 0).sum(axis=0)
        scale = np.where(active > 0, np.abs(code).sum(axis=0) / np.maximum(active, 1), 1.0)
        one_hot = np.zeros((len(units), code.shape[1]), np.float32)
        one_hot[np.arange(len(units)), units] = scale[units]
        base = self.decode(np.zeros((1, code.shape[1]), np.float32), k)
        return self.decode(one_hot, k) - base, units, counts


def load(path: str | os.PathLike) -> Autoencoder:
    """Reads a params.pkl written by ksae_jax; never executes code from the file."""
    payload = load_params_file(path)
    try:
        config = SweepConfig.from_dict(payload["config"])
    except (TypeError, ValueError, KeyError) as e:
        raise ParamsFileError(f"{path}: invalid config: {e}") from None
    ks = payload["ks"]
    expected = jax.eval_shape(functools.partial(model.init_params, config.model), jax.random.key(0))
    want = jax.tree.map(lambda s: (len(ks),) + s.shape, expected)
    try:
        got = jax.tree.map(np.shape, payload["params"])
    except Exception:  # noqa: BLE001 - any structural surprise is a bad file
        got = None
    if got != want:
        raise ParamsFileError(f"{path}: parameters do not match the config's {config.model.arch} "
                              f"model with {len(ks)} ks")
    return Autoencoder(config, ks, payload["params"], payload.get("metrics"))
