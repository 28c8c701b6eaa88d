"""Trained models read back from a params file (or a safetensors export): encode, decode and
reconstruct new images or vectors. Everything a file holds is checked when it is loaded."""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import models
from ksae_jax.checkpoint import ParamsFileError, load_params_file
from ksae_jax.config import SweepConfig, _is_int, check_k
from ksae_jax.topk import top_k, top_k_mask

_CHUNK = 2000  # rows per jitted call: bounds activation memory for large inputs


@functools.partial(jax.jit, static_argnames=("cfg", "max_k"))
def _encode(params, x, k, *, cfg, max_k):
    return models.encode(cfg, params, x, k, max_k)


@functools.partial(jax.jit, static_argnames=("cfg", "max_k"))
def _encode_topk(params, x, *, cfg, max_k):
    dense, _ = models.bind(cfg, params).encode_dense(x)
    return top_k(dense, max_k)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _decode(params, code, *, cfg):
    return models.decode(cfg, params, code)


@functools.partial(jax.jit, static_argnames=("cfg", "max_k"))
def _unit_counts(params, x, k, *, cfg, max_k):
    dense, _ = models.bind(cfg, params).encode_dense(x)
    return top_k_mask(dense, k, max_k).sum(axis=0)


def _chunked(fn, x: np.ndarray, empty_shape: tuple) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, *empty_shape), np.float32)
    return np.concatenate([np.asarray(fn(x[i:i + _CHUNK])) for i in range(0, len(x), _CHUNK)])


class _Models:
    """The models of one sweep (one per k), as numpy params with their config."""

    def __init__(self, config: SweepConfig, ks, params: dict, metrics: dict | None = None,
                 input_scale: float = 1.0):
        self.config = config
        self.ks = tuple(int(k) for k in ks)
        self.params = params
        self.metrics = metrics or {}
        self.input_scale = float(input_scale)

    @property
    def model_config(self) -> models.ModelConfig:
        return self.config.model

    def _k(self, k, what: str = "k") -> int:
        if not _is_int(k):
            raise ValueError(f"{what} must be an integer, got {k!r}")
        return int(k)

    def params_for(self, k: int) -> dict:
        """The parameters of the model trained with this k."""
        k = self._k(k)
        if k not in self.ks:
            raise ValueError(f"no model for k={k!r} in this file; it holds ks {list(self.ks)}")
        i = self.ks.index(k)
        return jax.tree.map(lambda a: a[i], self.params)

    def _inputs(self, x) -> np.ndarray:
        raise NotImplementedError

    def _codes(self, code) -> np.ndarray:
        return _rows(code, self.model_config.hidden, "code", "fiu")

    def encode(self, x, k: int, n_active: int | None = None) -> np.ndarray:
        """k-sparse codes (N, hidden) with the model of k (n_active: units kept, default k;
        e.g. 3 * k for classification features). One input without N gives N = 1."""
        p = self.params_for(k)
        n_active = self._k(k) if n_active is None else check_k(n_active, self.model_config.hidden,
                                                               "n_active")
        x = self._inputs(x)
        fn = functools.partial(_encode, p, k=jnp.int32(n_active), cfg=self.model_config,
                               max_k=n_active)
        return _chunked(fn, x, (self.model_config.hidden,))

    def decode(self, code, k: int) -> np.ndarray:
        """Inputs (N, ...) from codes (N, hidden) or one code (hidden,), with the model of k."""
        p = self.params_for(k)
        c = self._codes(code)
        out = _chunked(functools.partial(_decode, p, cfg=self.model_config), c,
                       self.model_config.input_shape)
        return out / np.float32(self.input_scale)

    def reconstruct(self, x, k: int) -> np.ndarray:
        return self.decode(self.encode(x, k), k)

    def unit_usage(self, x, k: int) -> np.ndarray:
        """For each code unit, on how many rows of x it is among the top k (0: dead)."""
        p, x = self.params_for(k), self._inputs(x)
        return sum((np.asarray(_unit_counts(p, x[i:i + _CHUNK], jnp.int32(k), cfg=self.model_config,
                                            max_k=k)) for i in range(0, len(x), _CHUNK)),
                   np.zeros(self.model_config.hidden))


class Autoencoder(_Models):
    """Image models (conv, mlp): inputs uint8 pixels 0..255 or floats in [0, 1], (N, 28, 28)."""

    def _inputs(self, images) -> np.ndarray:
        return as_images(images)

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


class VectorSAE(_Models):
    """TopK SAEs on (N, d) vectors. Inputs are scaled by the stored normalisation constant
    (input_scale) before encoding and outputs scaled back, so callers never see it."""

    def _inputs(self, x) -> np.ndarray:
        return _rows(x, self.model_config.d_in, "inputs", "f") * np.float32(self.input_scale)

    def encode_topk(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices), each (N, k): the kept latents of every vector."""
        p = self.params_for(k)
        x = self._inputs(x)
        if len(x) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        parts = [jax.device_get(_encode_topk(p, x[i:i + _CHUNK], cfg=self.model_config, max_k=k))
                 for i in range(0, len(x), _CHUNK)]
        return (np.concatenate([v for v, _ in parts]), np.concatenate([i for _, i in parts]))

    def decoder_directions(self, k: int) -> np.ndarray:
        """(n, d) unit decoder rows of the model of k (in normalised input space)."""
        return np.asarray(self.params_for(k)["W_dec"])


def _rows(x, width: int, name: str, kinds: str) -> np.ndarray:
    """(N, width) float32 from N rows or one row of `width` finite numbers of dtype kinds."""
    a = np.asarray(x)
    if a.ndim == 1 and a.shape[0] == width:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must have shape (N, {width}) or ({width},), got {a.shape}")
    if a.dtype.kind not in kinds:
        raise ValueError(f"{name} must hold {'floats' if kinds == 'f' else 'numbers'}, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} hold NaN or Inf")
    return a.astype(np.float32)


def as_images(images, name: str = "images") -> np.ndarray:
    """(N, 28, 28) float32 in [0, 1] from uint8 pixels 0..255 or floats in [0, 1]; one image
    may omit N. Anything else is refused with what is expected."""
    a = np.asarray(images)
    if a.shape == (28, 28):
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (28, 28):
        raise ValueError(f"{name} must have shape (N, 28, 28) or (28, 28), got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be uint8 pixels (0..255) or floats in [0, 1], got dtype "
                         f"{a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} hold NaN or Inf pixels")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name}: float pixels must lie in [0, 1], got [{a.min():g}, {a.max():g}] "
                         "(for 0..255 values pass uint8, or divide by 255)")
    return a


# ---------------------------------------------------------------- loading

def _bad(path, msg: str):
    raise ParamsFileError(f"{path}: {msg}")


def check_payload(path, config: SweepConfig, ks, params) -> dict:
    """The params of a file checked against its config: ks distinct positive ints <= hidden
    equal to config.ks; arrays of the configured models' shapes, float32 (float64 is cast
    with a warning), finite."""
    if not isinstance(ks, (list, tuple)) or not all(_is_int(k) for k in ks):
        _bad(path, f"'ks' must be a list of integers, got {ks!r}"[:300])
    ks = [int(k) for k in ks]
    if len(set(ks)) != len(ks) or any(k <= 0 or k > config.model.hidden for k in ks):
        _bad(path, f"'ks' must be distinct integers in 1..{config.model.hidden}, got {ks}")
    if tuple(ks) != config.ks:
        _bad(path, f"'ks' {ks} are not the config's ks {list(config.ks)}")
    expected = jax.eval_shape(functools.partial(models.init_params, config.model), jax.random.key(0))
    want = jax.tree.map(lambda s: (len(ks),) + s.shape, expected)
    try:
        got = jax.tree.map(np.shape, params)
    except Exception:  # noqa: BLE001 - any structural surprise is a bad file
        got = None
    if got != want:
        _bad(path, f"parameters do not match the config's {config.model.arch} model with "
                   f"{len(ks)} ks")

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


def load(path: str | os.PathLike) -> Autoencoder | VectorSAE:
    """Reads a params.pkl written by ksae_jax (or a folder from export_safetensors); never
    executes code from the file; refuses anything that is not a consistent set of models."""
    path = Path(path)
    if path.is_dir():
        from ksae_jax.export import read_safetensors_dir
        payload = read_safetensors_dir(path)
    else:
        payload = load_params_file(path)
    try:
        config = SweepConfig.from_dict(payload["config"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ParamsFileError(f"{path}: invalid config: {e}") from None
    params = check_payload(path, config, payload["ks"], payload["params"])
    scale = payload.get("input_scale", 1.0)
    if not (isinstance(scale, float) and 0 < scale < np.inf):
        _bad(path, f"input_scale must be a positive float, got {scale!r}")
    cls = Autoencoder if config.model.is_image else VectorSAE
    metrics = payload.get("metrics")
    return cls(config, payload["ks"], params, metrics if isinstance(metrics, dict) else {}, scale)
