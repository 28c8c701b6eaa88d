"""Frozen dataclasses that describe a model and a k sweep; saved beside every result."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

ARCHS = ("conv", "mlp")
LOSSES = ("mse", "bce")
DEFAULT_HIDDEN = {"conv": 256, "mlp": 1000}
DEFAULT_KS = (5, 10, 25, 50, 100)
BATCHINGS = ("auto", "loop", "vmap")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape-defining (static) description of one k-sparse autoencoder.

    arch: "conv" (the original PyTorch network) or "mlp" (Makhzani & Frey).
    hidden: width of the code; None takes the arch default (256 conv, 1000 mlp).
    tied: mlp only; the decoder weight is the encoder weight transposed.
    loss: "mse" (ReLU output for conv, linear for mlp) or "bce" (sigmoid output).
    """

    arch: str = "conv"
    hidden: int | None = None
    tied: bool = False
    loss: str = "mse"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.hidden is None:
            object.__setattr__(self, "hidden", DEFAULT_HIDDEN[self.arch])
        if not _is_int(self.hidden) or self.hidden <= 0:
            raise ValueError(f"hidden must be a positive integer, got {self.hidden!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.tied and self.arch != "mlp":
            raise ValueError("tied weights exist only for arch='mlp'")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One training run: every k in `ks` trained side by side (vmapped) with one seed.

    k_start/k_anneal_epochs: optional k schedule (Makhzani & Frey): each model starts at
    k_start and moves linearly to its own k over the first k_anneal_epochs epochs.
    batching: how the models share the compiled step: "vmap", "loop" (one model after
    another inside the step; faster for the conv network on CPU) or "auto" (loop for
    conv, vmap for mlp). Results agree to float rounding.
    """

    model: ModelConfig = ModelConfig()
    ks: tuple[int, ...] = DEFAULT_KS
    epochs: int = 9
    batch_size: int = 600
    lr: float = 1e-3
    l1: float = 1e-4
    seed: int = 1
    k_start: int | None = None
    k_anneal_epochs: float = 0.0
    batching: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(self.ks))
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        if not self.ks:
            raise ValueError("ks is empty: give at least one k")
        for k in self.ks:
            check_k(k, self.model.hidden)
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks has repeated values: {list(self.ks)}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.l1 >= 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.k_start is not None:
            check_k(self.k_start, self.model.hidden)
        if not 0 <= self.k_anneal_epochs <= self.epochs:
            raise ValueError(f"k_anneal_epochs must lie in [0, epochs], got {self.k_anneal_epochs!r}")

    @property
    def max_k(self) -> int:
        """Static width of lax.top_k for the whole sweep (schedule included)."""
        return max(self.ks + ((self.k_start,) if self.k_start else ()))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        d = dict(d)
        model = ModelConfig(**d.pop("model"))
        return cls(model=model, **{k: tuple(v) if k == "ks" else v for k, v in d.items()})


def check_k(k: Any, hidden: int) -> int:
    """Validates one k for a code of width `hidden`; returns it as a Python int."""
    if isinstance(k, np.integer):
        k = int(k)
    if not _is_int(k):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got k={k}")
    if k > hidden:
        raise ValueError(f"k={k} is larger than the hidden width {hidden}")
    return k
