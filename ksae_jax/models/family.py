"""What a model family is: the one object the training loop, evaluation, inference and the
files ask about a kind of model (nanodo's model factory; one small object per kind).

A family holds its model config (frozen, hashable: it is a static argument of jitted code)
and gives:

- `init(key)`, `data_sample(rows, cfg, mesh)` and `init_from_data(params, sample, cfg)`:
  fresh parameters (the data-dependent part traced, inside the jitted init);
- `forward(params, x, w, k, max_k, dead=..., aux_k=..., terms=...)`: THE forward pass, a
  NamedTuple with named parts; training, evaluation and inference all call it;
- `loss(...)`: the training objective, read off the forward's output;
- `eval_sums(out, x, w)`: what evaluation adds up over a held-out set;
- `project_grads` / `post_update`: the recipe's steps around the optimizer update;
  `resample(params, dirs, dead)`: dead units started again (SAEs);
- `rows(data, name)`, `input_scale(rows)`: the data it trains on;
- `code(out)`, `decode(params, code)`, `usage(out, k, max_k)`: for inference;
- `unit`, `rec_name`, `progress_names`, `shards_latents`: names and capabilities;
- `flags`, `sweeps_over`, `default_sweep`: what the experiments' flags set.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

from ksae_jax.data.feed import Rows


@dataclasses.dataclass(frozen=True)
class Family:
    """The interface and the defaults every family shares; see the module docstring."""

    model: Any
    """The family's model config (config.ImageModel or config.SaeModel)."""

    unit = "rows"                # what one training row is called in messages
    rec_name = "rec"             # the reconstruction metric ("mse", "fvu")
    progress_names = ("loss",)   # what the progress bar shows ("loss", "fvu", "dead")
    shards_latents = False       # whether the mesh's latent axis can split its parameters
    flags: tuple[str, ...] = ()  # model-config fields the experiments set from flags of that name
    sweeps_over = "ks"           # the per-model hyperparameter its sweeps vary ("ks", "l0_coefs")
    default_sweep: tuple = ()    # that hyperparameter's default values, where not the ks

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

    def data_sample(self, rows: Rows, cfg, mesh=None):
        """The training rows init_from_data reads, as one array (None: it reads none)."""
        del rows, cfg, mesh

    def init_from_data(self, params: dict, sample, cfg) -> dict:
        """Stacked fresh params (one per model of the sweep cfg) with what is initialised from
        the sample of training rows set (traced: runs inside the jitted init)."""
        del sample, cfg
        return params

    def bind(self, params: dict) -> nnx.Module:
        """The module for `params` (use inside jitted functions of the params pytree)."""
        return nnx.merge(self.graphdef, params)

    def forward(self, params: dict, x, w, k, max_k: int, *, dead=None, aux_k: int | None = None,
                terms: bool = True):
        """The forward pass of one model on a batch x with row weights w (0: padding),
        keeping k (traced, <= max_k, the static top-k width) units; with terms, also the
        loss terms (AuxK over the `dead` units when a mask is given)."""
        return self.bind(params)(x, w, k, max_k, dead=dead, aux_k=aux_k, terms=terms)

    def hyperparameters(self, cfg) -> dict[str, np.ndarray]:
        """Per-model hyperparameters of the loss besides k and lr (one value per model)."""
        del cfg
        return {}

    def loss(self, params: dict, batch: dict, hp: dict, dead, *, cfg, max_k: int):
        """(scalar loss, {"loss", "rec", "fired"}) of one model on one batch."""
        raise NotImplementedError

    def eval_sums(self, out, x, w) -> dict:
        """What evaluation adds up over the real rows of a batch: "sse" (squared error),
        "counts" ((hidden,) rows on which each unit fires), and any family-specific sums
        ("<name>_sse" become held-out "<name>_fvu")."""
        raise NotImplementedError

    def project_grads(self, params: dict, grads: dict) -> dict:
        return grads

    def post_update(self, new: dict, old: dict, keep, metrics: dict) -> dict:
        """The parameters after an optimizer update (`keep`: whether the update applied;
        metrics: the loss's, e.g. what a running estimate follows)."""
        del old, keep, metrics
        return new

    def resample(self, params: dict, dirs, dead) -> dict:
        """The parameters with the `dead` units started again along `dirs` (n, d) (SAEs)."""
        raise NotImplementedError

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
        """(B, hidden) dense k-sparse codes from a forward's output."""
        raise NotImplementedError

    def decode(self, params: dict, code):
        """Reconstructions from dense codes (B, hidden)."""
        raise NotImplementedError

    def usage(self, out, k, max_k: int):
        """(hidden,) how many rows have each unit among their top k."""
        raise NotImplementedError
