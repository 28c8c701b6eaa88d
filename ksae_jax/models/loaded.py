"""Trained models for inference: every k of a sweep (numpy params, leading axis = model) with
its config. encode, decode and reconstruct run the family's own forward and decoder, jitted,
in chunks; inputs are checked at the door. Each family subclasses `Loaded`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax.config import SweepConfig, _is_int, check_k
from ksae_jax.models.family import Family

CHUNK = 2000  # rows per jitted call: bounds activation memory for large inputs


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def forward_jit(params, x, k, *, family: Family, max_k: int):
    """The family's forward on unpadded rows, without the loss terms."""
    return family.forward(params, x, jnp.ones(x.shape[0]), k, max_k, terms=False)


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def reconstruct_jit(params, x, k, scale, *, family: Family, max_k: int):
    """Reconstructions of unscaled rows x: scaled in, the forward, scaled back out."""
    return forward_jit(params, x * scale, k, family=family, max_k=max_k).recon / scale


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def _encode(params, x, k, *, family: Family, max_k: int):
    return family.code(forward_jit(params, x, k, family=family, max_k=max_k))


@functools.partial(jax.jit, static_argnames=("family",))
def _decode(params, code, *, family: Family):
    return family.decode(params, code)


@functools.partial(jax.jit, static_argnames=("family", "max_k"))
def _usage(params, x, k, *, family: Family, max_k: int):
    return family.usage(forward_jit(params, x, k, family=family, max_k=max_k), k, max_k)


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
    """The models of one sweep (one per k), as numpy params with their config."""

    family_class: type[Family] = Family

    def __init__(self, config: SweepConfig, ks, params: dict, metrics: dict | None = None,
                 input_scale: float = 1.0):
        self.config = config
        self.family = self.family_class(config.model)
        self.ks = tuple(int(k) for k in ks)
        self.labels = config.labels  # the ks, or JumpReLU's L0 coefficients
        self.params = params
        self.metrics = metrics or {}
        self.input_scale = float(input_scale)

    @property
    def model_config(self):
        return self.config.model

    def _k(self, k, what: str = "k") -> int:
        if not _is_int(k):
            raise ValueError(f"{what} must be an integer, got {k!r}")
        return int(k)

    def index(self, k) -> int:
        """Which model a k names (JumpReLU: an L0 coefficient; None when there is one model)."""
        name = self.config.label_name
        if k is None:
            if len(self.labels) != 1:
                raise ValueError(f"this file holds {len(self.labels)} models: name one by "
                                 f"{name} ({list(self.labels)})")
            return 0
        if name == "k":
            k = self._k(k)
        if k not in self.labels:
            raise ValueError(f"no model for {name}={k!r} in this file; it holds {name}s "
                             f"{list(self.labels)}")
        return self.labels.index(k)

    def params_for(self, k=None) -> dict:
        """The parameters of the model trained with this k (see index)."""
        i = self.index(k)
        return jax.tree.map(lambda a: a[i], self.params)

    def _k_of(self, k) -> int:
        """The k the forward keeps for the model named k (1 for models without a k)."""
        return self.config.max_ks[self.index(k)] if not self.ks else self._k(k)

    def _inputs(self, x) -> np.ndarray:
        raise NotImplementedError

    def _codes(self, code) -> np.ndarray:
        return as_rows(code, self.model_config.hidden, "code", "fiu")

    def encode(self, x, k=None, n_active: int | None = None) -> np.ndarray:
        """Sparse codes (N, hidden) with the model of k (n_active: units kept, default k;
        e.g. 3 * k for classification features). One input without N gives N = 1."""
        p = self.params_for(k)
        n_active = self._k_of(k) if n_active is None else check_k(
            n_active, self.model_config.hidden, "n_active")
        fn = functools.partial(_encode, p, k=jnp.int32(n_active), family=self.family,
                               max_k=n_active)
        return chunked(fn, self._inputs(x), (self.model_config.hidden,))

    def decode(self, code, k=None) -> np.ndarray:
        """Inputs (N, ...) from codes (N, hidden) or one code (hidden,), with the model of k."""
        p = self.params_for(k)
        out = chunked(functools.partial(_decode, p, family=self.family), self._codes(code),
                      self.model_config.input_shape)
        return out / np.float32(self.input_scale)

    def reconstruct(self, x, k=None) -> np.ndarray:
        return self.decode(self.encode(x, k), k)

    def unit_usage(self, x, k=None) -> np.ndarray:
        """For each code unit, on how many rows of x it is among the top k (0: dead)."""
        p, x, kk = self.params_for(k), self._inputs(x), self._k_of(k)
        fn = functools.partial(_usage, p, k=jnp.int32(kk), family=self.family, max_k=kk)
        return sum((np.asarray(fn(x[i:i + CHUNK])) for i in range(0, len(x), CHUNK)),
                   np.zeros(self.model_config.hidden))
