"""What a model family is: its config (a `ModelConfig`), the one object the training loop,
evaluation, inference and the files ask about its maths (a `Family`), and its inference class
(`models.loaded.Loaded`). A family is one file that registers the three (`models.registry`).

A Family holds its model config (frozen, hashable: a static argument of jitted code) and gives:

- `init(key)`: fresh parameters;
- `forward(params, x, w, hp, max_k, dead=..., terms=...)`: THE forward pass, a NamedTuple with
  named parts; training, evaluation and inference all call it (hp: the model's traced
  hyperparameters, e.g. {"k": ...}; max_k: the static top-k width, None without a top-k);
- `loss_terms(out, hp)`: the reconstruction objective and the weighted sparsity penalty, from
  which the train step assembles the loss (reconstruction + penalty + AuxK);
- `fired(out, w)`, `eval_sums(out, x, w)`: what training counts and evaluation adds up;
- `rows(data, name)`, `input_scale(rows)`, `mse_unit(scale)`: the data it trains on;
- `code(out)`, `decode(params, code)`, `usage(out, hp, max_k)`: for inference;
- `recipe`: the steps around the optimizer update (`ksae_jax.recipe`), apart from the maths.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, NamedTuple

import jax
import numpy as np
from flax import nnx

from ksae_jax import checks
from ksae_jax.data.feed import Rows
from ksae_jax.recipe import Recipe


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every model config has beside its family's fields: the auxiliary loss that
    revives dead units (AuxK, Gao et al. 2024; off unless aux_coef > 0)."""

    aux_coef: float = 0.0
    """Weight of the AuxK loss that revives dead units (0: off)."""
    aux_k: int | None = None
    """Dead units that reconstruct the residual in AuxK (None: input width / 2, at most the
    code's units)."""
    dead_tokens: int | None = None
    """A unit is dead when it has not fired in this many training rows (None: min(10M, one
    pass over the training data))."""

    sweeps_over: ClassVar[str] = "ks"
    """The per-model hyperparameter a sweep of this family varies ("ks" or "l0_coefs")."""
    default_sweep: ClassVar[tuple] = ()
    """Its values when a sweep names none."""
    training_defaults: ClassVar[dict] = {}
    """The sweep's and the optimizer's settings this model trains with unless told
    otherwise (batch_size, seed, adam_eps; the learning rate is default_lr())."""

    def __post_init__(self):
        checks.finite_nonneg("aux_coef", self.aux_coef)
        if self.aux_k is None:
            object.__setattr__(self, "aux_k", min(max(self.input_width // 2, 1), self.latents))
        checks.check_k(self.aux_k, self.latents, name="aux_k")
        checks.positive_int("dead_tokens", self.dead_tokens, allow_none=True)

    @property
    def latents(self) -> int:
        """Units of the code."""
        raise NotImplementedError

    @property
    def units(self) -> int:
        """Code units the dead counters track (a CLT's: latents x layers)."""
        return self.latents

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def input_width(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def label_name(self) -> str:
        """What names a model of a sweep: "k" or "l0_coef"."""
        return self.sweeps_over[:-1]

    def default_lr(self) -> float:
        """The learning rate this model trains with unless told otherwise."""
        raise NotImplementedError

    def check_runnable(self) -> None:
        """Refuses (ValueError) a model this process cannot train or run (e.g. a kernel that
        does not serve it); files of such models still load."""

    def check_labels(self, ks: tuple, l0_coefs: tuple) -> None:
        """Refuses a sweep this model cannot train (ValueError)."""
        if l0_coefs:
            raise ValueError(f"l0_coefs are JumpReLU's; {self.arch} keeps k units (ks)")
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        for k in ks:
            checks.check_k(k, self.latents)


class LossTerms(NamedTuple):
    """What a family adds to the loss besides AuxK."""

    reconstruction: jax.Array
    """The reconstruction objective (MSE, FVU, FVU + Multi-TopK / 8, ...)."""
    penalty: jax.Array | None = None
    """The sparsity penalty, already weighted (lambda L1, l0_coef L0); None: none."""


@dataclasses.dataclass(frozen=True)
class Family:
    """The interface and the defaults every family shares; see the module docstring."""

    model: Any
    """The family's model config."""

    unit: ClassVar[str] = "rows"                # what one training row is called in messages
    rec_name: ClassVar[str] = "rec"             # the forward's reconstruction metric ("mse", "fvu")
    progress_names: ClassVar[tuple] = ("loss",)  # what the progress bar shows
    shards_latents: ClassVar[bool] = False      # whether the mesh's latent axis can split it
    recipe: ClassVar[Recipe] = Recipe()         # the steps around the optimizer update

    @property
    def lr_scales(self) -> dict[str, float]:
        """Parameter name -> multiplier of the learning rate (none by default)."""
        return {}

    def module(self, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    @functools.cached_property
    def graphdef(self):
        return nnx.graphdef(nnx.eval_shape(lambda: self.module(nnx.Rngs(0))))

    def init(self, key: jax.Array) -> dict:
        """Fresh parameters as a plain nested dict of arrays (vmappable over keys)."""
        return nnx.to_pure_dict(nnx.state(self.module(nnx.Rngs(params=key)), nnx.Param))

    def bind(self, params: dict) -> nnx.Module:
        """The module for `params` (use inside jitted functions of the params pytree)."""
        return nnx.merge(self.graphdef, params)

    def forward(self, params: dict, x, w, hp: dict, max_k: int | None, *, dead=None,
                terms: bool = True):
        """The forward pass of one model on a batch x with row weights w (0: padding); hp
        holds its traced hyperparameters (e.g. the k it keeps, <= max_k, the static top-k
        width); with terms, also the loss terms (AuxK over the `dead` units when a mask is
        given)."""
        return self.bind(params)(x, w, hp, max_k, dead=dead, terms=terms)

    def hyperparameters(self, cfg) -> dict[str, np.ndarray]:
        """Per-model hyperparameters besides k and lr (one value per model of the sweep)."""
        del cfg
        return {}

    def loss_terms(self, out, hp: dict) -> LossTerms:
        raise NotImplementedError

    def fired(self, out, w) -> jax.Array:
        """(latents,) bool: units that fired on a real row of the batch."""
        raise NotImplementedError

    def eval_sums(self, out, x, w) -> dict:
        """What evaluation adds up over the real rows of a batch: "sse" (squared error),
        "counts" ((latents,) rows on which each unit fires), and any family-specific sums
        ("<name>_sse" become held-out "<name>_fvu")."""
        raise NotImplementedError

    def target_columns(self) -> slice:
        """The columns of a row the model reconstructs (FVU's denominator): all of them,
        or a transcoder's output half."""
        return slice(None)

    def held_out_extras(self, sums: dict, n: int, denom: float) -> dict:
        """Held-out metrics from the family's own evaluation sums (float64, per model):
        "<name>_sse" becomes "<name>_fvu" (over the held-out set's total variance)."""
        del n
        return {name.replace("_sse", "_fvu"): v / denom for name, v in sums.items()}

    def rows(self, data, name: str) -> Rows:
        raise NotImplementedError

    def input_scale(self, rows: Rows) -> float:
        """The constant the inputs are multiplied by before the model sees them."""
        del rows
        return 1.0

    def mse_unit(self, scale: float) -> float:
        """What squared errors on scaled inputs are divided by to report MSE."""
        del scale
        return 1.0

    def code(self, out):
        """(B, latents) dense codes from a forward's output."""
        raise NotImplementedError

    def decode(self, params: dict, code):
        """Reconstructions from dense codes (B, latents)."""
        raise NotImplementedError

    def usage(self, out, hp: dict, max_k: int | None):
        """(latents,) on how many rows each unit is kept."""
        raise NotImplementedError
