"""What every sparse autoencoder of vectors shares, whatever selects its latents: the config's
fields (`SaeModel`: width, latents, the recipe's initialisation and AuxK settings), the
parameters W_enc (n, d), b_enc, W_dec (n, d), b_dec with the encoder and decoder products and
AuxK (`VectorSAEModule`), the data, codes and evaluation of a Family (`VectorFamily`: dense
(B, n) codes; TopK overrides them with its sparse ones), and inference (`VectorSAE`).

W_enc and W_dec are both stored (n, d), one row per latent (sparsify's layout), so sparse
paths move whole rows. The families (topk, batchtopk, matryoshka, jumprelu) build on these.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ksae_jax import checks, losses, sparse_ops
from ksae_jax.data.feed import Rows
from ksae_jax.data.vectors import VectorSource, normalizing_scale, open_vectors
from ksae_jax.models.family import Family, LossTerms, ModelConfig
from ksae_jax.models.layers import matmul
from ksae_jax.models.loaded import Loaded, as_rows, reconstruct_jit
from ksae_jax.recipe import VectorRecipe
from ksae_jax.topk import top_k


@dataclasses.dataclass(frozen=True)
class SaeModel(ModelConfig):
    """A sparse autoencoder of d_in-wide vectors (static shapes, the recipe's initialisation
    and its AuxK); each family's config extends it."""

    d_in: int
    """Width of the input vectors."""
    latents: int | None = None
    """Latents n; None: 8 * d_in."""
    normalize: bool = False
    """Scale the inputs by one constant so that the training rows' mean squared norm is d_in
    (the constant is stored with the params and applied by encode and decode)."""
    init_scale: float | Literal["fit"] = "fit"
    """Norm of the encoder rows at init: W_enc = init_scale * W_dec, decoder rows unit
    vectors (1: Gao et al.'s W_enc = W_dec^T; sparsify's Kaiming-uniform encoder is about
    0.577; SAELens starts at 0.1); "fit": each model's scale is the one whose first
    reconstructions of training rows have the least squared error (it falls with k;
    docs/lm.md shows why it is the default)."""
    b_dec_init: Literal["median", "mean", "zero"] = "mean"
    """b_dec at init: the mean of training rows (as sparsify: docs/lm.md shows why), their
    geometric median (Gao et al.), or zero."""
    b_enc_init: Literal["zero", "balanced"] = "balanced"
    """b_enc at init: zero, or "balanced": each latent's threshold at its own (1 - k/n)
    quantile over training rows, so that every latent starts firing on about k/n of them
    (less a part of their mean: b_enc_mean_keep)."""
    b_enc_mean_keep: float = 0.5
    """b_enc_init "balanced": the share of the latents' mean threshold b_enc keeps. 1: each
    latent's own threshold (the chosen values start shrunk by it); 0: the thresholds less
    their mean (top-k chooses the same latents, at full value); 0.5 between."""
    init_dirs: Literal["random", "data", "mixed", "diverse"] = "random"
    """Decoder rows at init: "random" unit vectors (with the balanced b_enc, docs/lm.md shows
    why); "data": the directions of n training rows (centred on b_dec), so that every latent
    starts as the best match of some row; "mixed": each such direction plus init_mix times a
    random unit one (the lowest FVU, but more dead latents); "diverse": data directions with
    no two closer than cosine 0.9 while the sample has enough."""
    init_mix: float = 1.0
    """init_dirs "mixed": the weight of the random unit direction added to each data one."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the dense matmuls ("bfloat16": bf16 inputs, f32 accumulation; the
    weights, Adam and the sparse gathers and scatters stay float32)."""
    aux_coef: float = dataclasses.field(default=1 / 32, kw_only=True)
    """Weight of the AuxK loss that revives dead latents (Gao et al.: 1/32; 0: off)."""
    resample_every: int = dataclasses.field(default=0, kw_only=True)
    """After every this many steps of the first half of the budget, the latents that have
    not fired since the last time start again along the batch's residuals, Adam moments
    zeroed (Bricken et al. 2023; 0: off)."""

    default_sweep: ClassVar[tuple] = (16, 32, 64, 128)
    training_defaults: ClassVar[dict] = {"batch_size": 4096, "seed": 0, "adam_eps": 6.25e-10}

    def __post_init__(self):
        check_widths(self)
        checks.choice(self, "b_dec_init", "b_enc_init", "init_dirs", "dtype")
        if self.init_scale != "fit":
            checks.positive("init_scale", self.init_scale)
        checks.finite_nonneg("init_mix", self.init_mix)
        if self.init_mix != 1.0 and self.init_dirs != "mixed":
            raise ValueError("init_mix: only init_dirs 'mixed' mixes in random directions")
        checks.fraction("b_enc_mean_keep", self.b_enc_mean_keep)
        if self.b_enc_mean_keep != 0.5 and self.b_enc_init == "zero":
            raise ValueError("b_enc_mean_keep: only b_enc_init 'balanced' has thresholds")
        checks.nonneg_int("resample_every", self.resample_every)
        super().__post_init__()

    @staticmethod
    def hookpoints_for(layers) -> tuple[str, ...]:
        """What SAEs of these blocks read (--layers): each block's output."""
        return tuple(f"resid_post.{layer}" for layer in layers)

    @staticmethod
    def check_hookpoint(name: str) -> None:
        """Refuses (ValueError) a hookpoint this model cannot read."""

    @classmethod
    def width_fields(cls, width: int, hookpoint: str | None = None) -> dict:
        """The shape fields of a model of rows `width` wide (read at `hookpoint`, live)."""
        del hookpoint
        return {"d_in": width}

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.d_in,)

    def default_lr(self) -> float:
        """Gao et al.'s 2e-4 / sqrt(latents / 2^14)."""
        return 2e-4 / math.sqrt(self.latents / 2 ** 14)


def check_widths(cfg, names: tuple[str, ...] = ("d_in",)) -> None:
    """The shape fields as positive ints (ValueError naming the field), latents defaulting
    to 8 d_in (per layer for a CLT)."""
    for name in names:
        checks.positive_int(name, getattr(cfg, name))
        object.__setattr__(cfg, name, int(getattr(cfg, name)))
    if cfg.latents is None:
        object.__setattr__(cfg, "latents", 8 * cfg.d_in)
    checks.positive_int("latents", cfg.latents)
    object.__setattr__(cfg, "latents", int(cfg.latents))


def squared_error(recon, x, w):
    """Squared error summed over the real rows."""
    return jnp.sum(jnp.square(recon - x).reshape(x.shape[0], -1).sum(-1) * w)


class VectorSAEModule(nnx.Module):
    """The parameters and the products every vector SAE computes; a family's module adds its
    __call__ (x, w, hp, max_k, *, dead, terms) -> its output NamedTuple."""

    def __init__(self, cfg: SaeModel, *, rngs: nnx.Rngs):
        rows = jax.random.normal(rngs.params(), (cfg.latents, cfg.d_in), jnp.float32)
        rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
        scale = 1.0 if cfg.init_scale == "fit" else cfg.init_scale  # "fit": set from the data
        self.W_enc = nnx.Param(rows * scale if scale != 1 else rows)
        self.b_enc = nnx.Param(jnp.zeros((cfg.latents,), jnp.float32))
        self.W_dec = nnx.Param(rows)
        self.b_dec = nnx.Param(jnp.zeros((cfg.d_in,), jnp.float32))
        self.cfg = cfg

    def preacts(self, x):
        """(B, n) encoder matmul (x - b_dec) W_enc^T, b_enc not added (top_k adds it on the
        fly), as a constant: it selects; the kept values get their gradient from
        `kept_values`."""
        W, b_dec = lax.stop_gradient((self.W_enc[...], self.b_dec[...]))
        return matmul(x - b_dec, W.T, self.cfg.dtype)

    def dense_pre(self, x):
        """(B, n) pre-activations (x - b_dec) W_enc^T + b_enc, differentiable (the dense-code
        families' encoder)."""
        return matmul(x - self.b_dec[...], self.W_enc[...].T, self.cfg.dtype) + self.b_enc[...]

    def select(self, pre, k: int, dead=None, path: str = "sparse"):
        """(values, indices) of the k largest pre-activations pre + b_enc of each row, among
        the `dead` latents only when a mask is given (native_ops' kernel on the native path)."""
        bias = lax.stop_gradient(self.b_enc[...])
        if dead is not None:
            bias = jnp.where(dead, bias, -jnp.inf)
        return top_k(pre, k, bias, native=path == "native")

    def kept_values(self, values, x, idx, path: str):
        """Pre-activations at idx, differentiable in the encoder (backward by `path`)."""
        fn = sparse_ops.dense_preacts if path == "dense" else sparse_ops.sparse_preacts
        return fn(lax.stop_gradient(values), x, self.W_enc[...], self.b_enc[...],
                  self.b_dec[...], idx, path == "native")

    def decode_sparse(self, values, idx, path: str):
        """sum_j values[:, j] W_dec[idx[:, j]], without b_dec."""
        fn = sparse_ops.dense_decode if path == "dense" else sparse_ops.sparse_decode
        return fn(values, idx, self.W_dec[...], path == "native")

    def decode_dense(self, code):
        """code @ W_dec + b_dec, for (B, n) codes."""
        return matmul(code, self.W_dec[...], self.cfg.dtype) + self.b_dec[...]

    def auxk(self, pre, x, w, recon, dead, denom, path: str = "sparse"):
        """AuxK: the aux_k largest pre-activations among the dead latents decode the residual."""
        aux_k = self.cfg.aux_k

        def select_dead(dead):
            masked, ids = self.select(pre, aux_k, dead, path)
            vals = jax.nn.relu(self.kept_values(masked, x, ids, path))
            return jnp.where(dead[ids], vals, 0.0), ids

        def decode_dead(values, ids):
            return self.decode_sparse(values, ids, path)

        return losses.auxk_loss(select_dead, decode_dead, x, w, recon, dead, aux_k, denom)

    def dense_terms(self, x, w, pre, code, dead):
        """(recon, pre without b_enc (what AuxK selects from), FVU, AuxK or None) of a (B, n)
        code, the dense-code families' common part."""
        recon = self.decode_dense(code)
        selecting = lax.stop_gradient(pre - self.b_enc[...])
        denom = losses.total_variance(x, w)
        fvu = losses.fvu(recon, x, w, denom)
        aux = None if dead is None else self.auxk(selecting, x, w, recon, dead, denom)
        return recon, selecting, fvu, aux


class VectorFamily(Family):
    """Float vectors in, FVU (+ the family's terms) out; dense (B, n) codes (`out.code`)."""

    unit = "vectors"
    rec_name = "fvu"
    progress_names = ("fvu", "dead")
    shards_latents = True
    recipe = VectorRecipe()

    def loss_terms(self, out, hp):
        return LossTerms(out.fvu)

    def fired(self, out, w):
        return jnp.any((out.code > 0) & (w[:, None] > 0), axis=0)

    def eval_sums(self, out, x, w):
        counts = jnp.sum((out.code > 0) * w[:, None], axis=0)
        return {"sse": squared_error(out.recon, x, w), "counts": counts}

    def rows(self, data, name):
        if not isinstance(data, VectorSource):
            data = open_vectors(data)
        if data.row_shape != self.model.input_shape:
            raise ValueError(f"{name} has rows of shape {data.row_shape}; the model takes "
                             f"{self.model.input_shape}")
        return data

    def input_scale(self, rows: Rows) -> float:
        """With normalize: the constant that makes the training rows' mean squared norm d."""
        if not self.model.normalize:
            return 1.0
        return normalizing_scale(rows)

    def mse_unit(self, scale):
        return scale ** 2

    def code(self, out):
        return out.code

    def decode(self, params, code):
        return code @ params["W_dec"] + params["b_dec"]

    def usage(self, out, hp, max_k):
        return jnp.sum(out.code > 0, axis=0).astype(jnp.float32)


class VectorSAE(Loaded):
    """SAEs on (N, d) vectors. Inputs are scaled by the stored normalisation constant
    (input_scale) before encoding and outputs scaled back, so callers never see it."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._on_device: dict[int, dict] = {}  # params of each model, put once for reconstruct_array

    def _inputs(self, x) -> np.ndarray:
        return as_rows(x, self.model_config.d_in, "inputs", "f") * np.float32(self.input_scale)

    def reconstruct_array(self, x: jax.Array, *label, **named) -> jax.Array:
        """Reconstructions of the rows of a JAX array (e.g. from DLPack) on its device: no
        host copy and no input checks (the caller's array is trusted)."""
        i = self.index(*label, **named)
        if i not in self._on_device:
            self._on_device[i] = jax.device_put(self._params(i))
        hp, max_k = self.hp(i)
        return reconstruct_jit(self._on_device[i], x, hp, jnp.float32(self.input_scale),
                               family=self.family, max_k=max_k)

    def saelens_view(self, *label, **named) -> tuple[str, int | None, np.ndarray | None]:
        """(SAELens architecture, its k, its threshold) of the model a label names."""
        raise NotImplementedError

    def saelens_fields(self) -> dict:
        """cfg.json fields of SAELens's layout beside the SAEs' (a transcoder's d_out)."""
        return {}

    def sparsify_fields(self) -> dict | None:
        """The cfg.json fields of sparsify's layout that say what these models are (None:
        sparsify has no such models)."""
        return None

    def decoder_directions(self, *label, **named) -> np.ndarray:
        """(n, d) unit decoder rows of the model a label names (in normalised input space)."""
        return np.asarray(self.params_for(*label, **named)["W_dec"])
