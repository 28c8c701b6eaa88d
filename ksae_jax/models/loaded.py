"""Trained models for inference: every model of a sweep (numpy params, leading axis = model)
with its config. A model is named by its label: its k (`encode(x, 32)`, `encode(x, k=32)`),
or for a sweep over another hyperparameter that one (`encode(x, l0_coef=0.001)`), or the
string "k=32"; a file of one model needs no name. encode, decode and reconstruct run the
family's own forward and decoder, jitted, in chunks; inputs are checked at the door. Each
family subclasses `Loaded`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import checks
from ksae_jax.models.family import Family

CHUNK = 2000  # rows per jitted call: bounds activation memory for large inputs


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def forward_jit(params, x, hp, *, family: Family, max_k: int | None):
    """The family's forward on unpadded rows, without the loss terms."""
    return family.forward(params, x, jnp.ones(x.shape[0]), hp, max_k, terms=False)


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def reconstruct_jit(params, x, hp, scale, *, family: Family, max_k: int | None):
    """Reconstructions of unscaled rows x: scaled in, the forward, scaled back out."""
    return forward_jit(params, x * scale, hp, family=family, max_k=max_k).recon / scale


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def _encode(params, x, hp, *, family: Family, max_k: int | None):
    return family.code(forward_jit(params, x, hp, family=family, max_k=max_k))


@functools.partial(jax.jit, static_argnames=("family",))
def _decode(params, code, *, family: Family):
    return family.decode(params, code)


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def _usage(params, x, hp, *, family: Family, max_k: int | None):
    return family.usage(forward_jit(params, x, hp, family=family, max_k=max_k), hp, max_k)


def chunked(fn, x: np.ndarray, empty_shape: tuple) -> np.ndarray:
    """fn over x in chunks of CHUNK rows, concatenated (an empty x gives an empty result)."""
    if len(x) == 0:
        return np.zeros((0, *empty_shape), np.float32)
    return np.concatenate([np.asarray(fn(x[i:i + CHUNK])) for i in range(0, len(x), CHUNK)])


def as_rows(x, width: int, name: str, kinds: str) -> np.ndarray:
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


class Loaded:
    """The models of one sweep, as numpy params with their config."""

    def __init__(self, config, params: dict, metrics: dict | None = None,
                 input_scale: float = 1.0):
        self.config = config
        self.family = config.family
        self.labels = config.labels  # the ks, or the values of the hyperparameter swept
        self.ks = config.ks
        self.params = params
        self.metrics = metrics or {}
        self.input_scale = float(input_scale)

    @property
    def model_config(self):
        return self.config.model

    @property
    def label_name(self) -> str:
        return self.config.label_name

    def index(self, *label, **named) -> int:
        """Which model a label names: one value (a k, an L0 coefficient), the same as a keyword
        named after the sweep (k=32, l0_coef=0.001) or a string "k=32"; none for a file of one
        model."""
        name = self.label_name
        if len(label) + len(named) > 1:
            raise ValueError(f"name one model, by its {name}; got {label} {named}")
        if named:
            (given, value), = named.items()
            if given != name:
                raise ValueError(f"this file's models are named by {name}, not {given} "
                                 f"({name}s {list(self.labels)})")
            label = (value,)
        if not label or label[0] is None:
            if len(self.labels) != 1:
                raise ValueError(f"this file holds {len(self.labels)} models: name one by "
                                 f"{name} ({list(self.labels)})")
            return 0
        value = label[0]
        if isinstance(value, str) and value.startswith(f"{name}="):
            value = value.split("=", 1)[1]
            value = int(value) if name == "k" and value.lstrip("-").isdigit() else float(value)
        if name == "k" and not checks.is_int(value):
            raise ValueError(f"k must be an integer, got {value!r}")
        if value not in self.labels:
            raise ValueError(f"no model for {name}={value!r} in this file; it holds {name}s "
                             f"{list(self.labels)}")
        return self.labels.index(value)

    def params_for(self, *label, **named) -> dict:
        """The parameters of the model a label names (see index)."""
        i = self.index(*label, **named)
        return jax.tree.map(lambda a: a[i], self.params)

    def hp(self, i: int, k: int | None = None) -> tuple[dict, int | None]:
        """(traced hyperparameters, static top-k width) of model i keeping k units (default
        its own k); a family without k gets none."""
        if not self.ks:
            return {}, None
        k = self.ks[i] if k is None else k
        return {"k": jnp.int32(k)}, k

    def _inputs(self, x) -> np.ndarray:
        raise NotImplementedError

    def _codes(self, code) -> np.ndarray:
        return as_rows(code, self.model_config.units, "code", "fiu")

    def encode(self, x, *label, n_active: int | None = None, **named) -> np.ndarray:
        """Sparse codes (N, latents) with the model a label names (n_active: units kept,
        default its k; e.g. 3 * k for classification features). One input without N gives
        N = 1."""
        i = self.index(*label, **named)
        if n_active is not None:
            if not self.ks:
                raise ValueError(f"n_active: {self.model_config.arch} models keep no fixed "
                                 "number of units")
            n_active = checks.check_k(n_active, self.model_config.latents, "n_active")
        hp, max_k = self.hp(i, n_active)
        fn = functools.partial(_encode, self._params(i), hp=hp, family=self.family, max_k=max_k)
        return chunked(fn, self._inputs(x), (self.model_config.units,))

    def decode(self, code, *label, **named) -> np.ndarray:
        """Inputs (N, ...) from codes (N, latents) or one code (latents,), with the model a
        label names."""
        p = self._params(self.index(*label, **named))
        out = chunked(functools.partial(_decode, p, family=self.family), self._codes(code),
                      self.model_config.input_shape)
        return out / np.float32(self.input_scale)

    def reconstruct(self, x, *label, **named) -> np.ndarray:
        i = self.index(*label, **named)
        return self.decode(self.encode(x, self.labels[i]), self.labels[i])

    def unit_usage(self, x, *label, **named) -> np.ndarray:
        """For each code unit, on how many rows of x it is kept (0: dead)."""
        i = self.index(*label, **named)
        x, (hp, max_k) = self._inputs(x), self.hp(i)
        fn = functools.partial(_usage, self._params(i), hp=hp, family=self.family, max_k=max_k)
        return sum((np.asarray(fn(x[j:j + CHUNK])) for j in range(0, len(x), CHUNK)),
                   np.zeros(self.model_config.units))

    def _params(self, i: int) -> dict:
        return jax.tree.map(lambda a: a[i], self.params)
