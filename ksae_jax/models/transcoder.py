"""The transcoder family: a sparse code of an MLP's input that reconstructs that MLP's output,
so that the MLP can be replaced by something readable (sparsify's `transcode=True`; Paulo et
al. 2025's skip transcoders add a linear map of the input):

    z = ReLU(TopK(W_enc x + b_enc)),   y_hat = W_dec^T z + b_dec (+ W_skip x),

trained on the FVU of the MLP's output y (+ AuxK over the dead latents, as the SAEs). A
training row is the pair [x | y] (2 d wide: mlp_in.L beside mlp_out.L, from the live model
or a cache), so the sweep's batching, buffers and sharding are the SAEs'; the forward reads
the source half and scores the target half. The sweep over k is traced, as for TopK SAEs.

The initialisation (`transcoder_init`) is measured in docs/transcoders.md: "zero" is sparsify's (a
zero decoder whose rows' norms are free, the encoder's rows of norm about 0.58 centred on
the inputs' mean, b_dec the outputs' mean); "paired" starts each latent on one training
pair (decoder row along its centred output, kept at unit norm; encoder row along its
centred input, with a threshold that fires it on about k/n of the rows and one scale
fitted to the first reconstructions). Registered as arch "transcoder" and, with the skip
map, "skip-transcoder"."""
from __future__ import annotations

import dataclasses
import math
import re
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ksae_jax import checks, losses
from ksae_jax.models.family import LossTerms, ModelConfig
from ksae_jax.models.layers import matmul
from ksae_jax.models.loaded import CHUNK, forward_jit
from ksae_jax.models.registry import register
from ksae_jax.models.topk import sparse_path
from ksae_jax.models.vector import (VectorFamily, VectorSAE, VectorSAEModule, check_widths,
                                    squared_error)
from ksae_jax.recipe import VectorRecipe, balanced_bias, unit_norm_rows

ENCODER_NORM = 1 / math.sqrt(3)  # a Kaiming-uniform row's norm (sparsify's nn.Linear)


@dataclasses.dataclass(frozen=True)
class TranscoderModel(ModelConfig):
    """A transcoder from d_in-wide MLP inputs to the MLP's d_in-wide outputs; its rows are
    the pairs [input | output]."""

    d_in: int
    """Width of the MLP's input and output (a training row holds both: 2 d_in)."""
    latents: int | None = None
    """Latents n; None: 8 * d_in."""
    arch: Literal["transcoder", "skip-transcoder"] = "transcoder"
    """The family: "skip-transcoder" adds the linear skip map W_skip x."""
    activation: Literal["topk", "batchtopk"] = "topk"
    """"topk": each row keeps its k largest latents; "batchtopk": a batch of B rows keeps its
    B k largest (Bussmann et al.), served as a JumpReLU with one threshold estimated in
    training (what SAELens's jumprelu transcoders hold)."""
    threshold_lr: float = 0.01
    """batchtopk: the served threshold moves this fraction of the way to each training
    batch's smallest kept activation."""
    transcoder_init: Literal["zero", "paired"] = "paired"
    """"zero": sparsify's recipe (a zero decoder at init, decoder norms free throughout; what
    an imported sparsify transcoder trains on with); "paired": each latent starts on one
    training pair, decoder rows kept at unit norm (docs/transcoders.md measures both)."""
    decoder: Literal["auto", "native", "sparse", "dense"] = "auto"
    """How the top-k gathers and scatters run (as TopK SAEs' decoder setting)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the dense matmuls (float32 accumulation)."""
    aux_coef: float = dataclasses.field(default=1 / 32, kw_only=True)
    """Weight of the AuxK loss that revives dead latents (Gao et al.: 1/32; 0: off)."""

    sweeps_over: ClassVar[str] = "ks"
    default_sweep: ClassVar[tuple] = (16, 32, 64, 128)
    training_defaults: ClassVar[dict] = {"batch_size": 4096, "seed": 0, "adam_eps": 6.25e-10}
    normalize: ClassVar[bool] = False  # inputs are never rescaled

    def __post_init__(self):
        check_widths(self)
        checks.choice(self, "arch", "activation", "transcoder_init", "decoder", "dtype")
        checks.fraction("threshold_lr", self.threshold_lr, low_open=True)
        if self.threshold_lr != 0.01 and self.activation != "batchtopk":
            raise ValueError("threshold_lr: only the batchtopk activation has a threshold")
        super().__post_init__()

    @classmethod
    def width_fields(cls, width: int, hookpoint: str | None = None) -> dict:
        """Rows of `width` are pairs: d_in is half of it."""
        del hookpoint
        if width % 2:
            raise ValueError(f"a transcoder's rows are [input | output] pairs; rows of width "
                             f"{width} are not")
        return {"d_in": width // 2}

    @staticmethod
    def hookpoints_for(layers) -> tuple[str, ...]:
        """What transcoders of these blocks read: each MLP's input and output."""
        return tuple(f"mlp.{layer}" for layer in layers)

    @staticmethod
    def check_hookpoint(name: str) -> None:
        if not re.fullmatch(r"mlp\.\d+", name):
            raise ValueError(f"hookpoint {name}: a transcoder reads an MLP's input and output "
                             "(--layers L, or --hookpoints mlp.L)")

    @property
    def skip(self) -> bool:
        return self.arch == "skip-transcoder"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2 * self.d_in,)

    def default_lr(self) -> float:
        """Gao et al.'s 2e-4 / sqrt(latents / 2^14), as the SAEs."""
        return 2e-4 / math.sqrt(self.latents / 2 ** 14)


class TranscoderOutput(NamedTuple):
    """One forward pass of a transcoder on a batch of pairs."""

    recon: jax.Array
    """(B, d) the MLP output's reconstruction (b_dec and the skip map included)."""
    values: jax.Array | None
    """topk: (B, K) kept activations after ReLU (0 beyond the model's k)."""
    indices: jax.Array | None
    """topk: (B, K) the latents they belong to."""
    code: jax.Array | None = None
    """batchtopk: (B, n) kept activations (0 elsewhere)."""
    min_kept: jax.Array | None = None
    """batchtopk: the batch's smallest kept activation (moves the threshold)."""
    fvu: jax.Array | None = None
    """Fraction of the MLP output's variance unexplained over the batch's real rows."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""


def split(cfg: TranscoderModel, x):
    """(source, target) halves of pair rows."""
    return x[:, :cfg.d_in], x[:, cfg.d_in:]


class Transcoder(VectorSAEModule):
    """The SAE's parameters and products, with an encoder that reads the source as it is
    (b_dec lives in the target's space) and an optional skip map."""

    def __init__(self, cfg: TranscoderModel, *, rngs: nnx.Rngs):
        enc = jax.random.normal(rngs.params(), (cfg.latents, cfg.d_in), jnp.float32)
        dec = jax.random.normal(rngs.params(), (cfg.latents, cfg.d_in), jnp.float32)
        self.W_enc = nnx.Param(unit_norm_rows(enc) * ENCODER_NORM)
        self.b_enc = nnx.Param(jnp.zeros((cfg.latents,), jnp.float32))
        self.W_dec = nnx.Param(unit_norm_rows(dec))
        self.b_dec = nnx.Param(jnp.zeros((cfg.d_in,), jnp.float32))
        if cfg.skip:
            self.W_skip = nnx.Param(jnp.zeros((cfg.d_in, cfg.d_in), jnp.float32))
        if cfg.activation == "batchtopk":
            self.threshold = nnx.Param(jnp.zeros((), jnp.float32))  # moved by the recipe only
        self.cfg = cfg

    def preacts(self, src):
        return matmul(src, lax.stop_gradient(self.W_enc[...]).T, self.cfg.dtype)

    def kept_values(self, values, src, idx, path: str):
        from ksae_jax import sparse_ops
        fn = sparse_ops.dense_preacts if path == "dense" else sparse_ops.sparse_preacts
        return fn(lax.stop_gradient(values), src, self.W_enc[...], self.b_enc[...],
                  jnp.zeros_like(src[0]), idx, path == "native")

    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> TranscoderOutput:
        src, tgt = split(self.cfg, x)
        path = sparse_path(self.cfg, self.cfg.aux_k if self.cfg.activation == "batchtopk"
                           else max_k)
        pre = self.preacts(src)  # (B, n) without b_enc: what the top k and AuxK select from
        if self.cfg.activation == "batchtopk":
            out = self.batch_top_k(src, w, hp["k"], terms)
        else:
            top, idx = self.select(pre, max_k, path=path)
            values = jax.nn.relu(self.kept_values(top, src, idx, path))
            values = jnp.where(jnp.arange(max_k) < hp["k"], values, 0.0)
            out = TranscoderOutput(self.decode_sparse(values, idx, path) + self.b_dec[...],
                                   values, idx)
        if self.cfg.skip:
            out = out._replace(recon=out.recon + matmul(src, self.W_skip[...].T, self.cfg.dtype))
        recon = out.recon
        if not terms:
            return out
        denom = losses.total_variance(tgt, w)
        out = out._replace(fvu=losses.fvu(recon, tgt, w, denom))
        if dead is not None:
            out = out._replace(auxk=self.auxk_of(pre, src, tgt, w, recon, dead, denom, path))
        return out

    def batch_top_k(self, src, w, k, terms: bool) -> TranscoderOutput:
        """The batch's top B k activations in training, the threshold's otherwise (dense)."""
        from ksae_jax.models.batchtopk import batch_keep
        pre = matmul(src, self.W_enc[...].T, self.cfg.dtype) + self.b_enc[...]
        acts = jax.nn.relu(pre)
        keep = (lax.stop_gradient(batch_keep(lax.stop_gradient(acts), w, k)) if terms
                else pre > self.threshold[...])
        code = jnp.where(keep, acts, 0.0)
        min_kept = jnp.min(jnp.where(keep, lax.stop_gradient(acts), jnp.inf))
        recon = matmul(code, self.W_dec[...], self.cfg.dtype) + self.b_dec[...]
        return TranscoderOutput(recon, None, None, code, min_kept)

    def auxk_of(self, pre, src, tgt, w, recon, dead, denom, path):
        """AuxK: the dead latents' top aux_k activations reconstruct the output's residual."""
        def select_dead(dead):
            masked, ids = self.select(pre, self.cfg.aux_k, dead, path)
            vals = jax.nn.relu(self.kept_values(masked, src, ids, path))
            return jnp.where(dead[ids], vals, 0.0), ids

        return losses.auxk_loss(select_dead, lambda v, i: self.decode_sparse(v, i, path), tgt,
                                w, recon, dead, self.cfg.aux_k, denom)


class TranscoderRecipe(VectorRecipe):
    """The initialisation of `TranscoderModel.transcoder_init`; decoder rows kept at unit norm for
    "paired" (as the SAEs'), free for "zero" (as sparsify's); no resampling."""

    def init_from_data(self, params, sample, cfg):
        mc = cfg.model
        src, tgt = split(mc, sample["x"])
        w = sample["valid"].astype(jnp.float32)
        mean_src, mean_tgt = ((w @ a) / jnp.maximum(w.sum(), 1.0) for a in (src, tgt))
        params = {**params, "b_dec": jnp.broadcast_to(mean_tgt, params["b_dec"].shape)}
        if mc.transcoder_init == "zero":
            return {**params, "W_dec": jnp.zeros_like(params["W_dec"]),
                    "b_enc": -jnp.einsum("mnd,d->mn", params["W_enc"], mean_src)}
        return paired_init(params, src - mean_src, tgt - mean_tgt, mean_src, sample, cfg)

    def project_grads(self, params, grads, model):
        if model.transcoder_init == "zero":
            return grads
        return super().project_grads(params, grads, model)

    def post_update(self, new, old, keep, out, model):
        """Unit decoder rows again ("paired"); batchtopk's threshold estimate."""
        from ksae_jax.models.batchtopk import moved_threshold
        if model.transcoder_init != "zero":
            new = super().post_update(new, old, keep, out, model)
        if model.activation == "batchtopk":
            new = {**new, "threshold": moved_threshold(old["threshold"], out.min_kept, keep,
                                                       model.threshold_lr)}
        return new

    def resample_every(self, model) -> int:
        return 0


def paired_init(params, src_c, tgt_c, mean_src, sample, cfg):
    """Latent i along training pair i (in a seeded order): decoder row the unit direction
    of its centred output, encoder row that of its centred input; each model's b_enc fires
    every latent on about k/n of the first rows, and one scale per model fits the encoder
    to the outputs' first reconstructions (least squares)."""
    from ksae_jax.recipe import FIT_ROWS
    n, valid = cfg.model.latents, sample["valid"]
    count = jnp.sum(valid)
    idx = jnp.argsort(sample["order"])[jnp.arange(n) % count]
    noise = jax.random.normal(jax.random.key(cfg.seed), (2, n, src_c.shape[1]))
    again = (jnp.arange(n) >= count)[:, None] * 0.3  # rows past the sample: mixed with noise
    enc = unit_norm_rows(unit_norm_rows(src_c[idx]) + again * unit_norm_rows(noise[0]))
    dec = unit_norm_rows(unit_norm_rows(tgt_c[idx]) + again * unit_norm_rows(noise[1]))
    fit = min(FIT_ROWS, cfg.batch_size)
    W_enc, b_enc = [], []
    for k in cfg.max_ks:
        bias = balanced_bias(src_c[:fit], enc, k, valid[:fit])
        s = fitted_scale(src_c[:fit], tgt_c[:fit], enc, bias, dec, k, valid[:fit])
        W_enc.append(s * enc)
        b_enc.append(s * (bias - enc @ mean_src))
    m = len(cfg.max_ks)
    return {**params, "W_enc": jnp.stack(W_enc), "b_enc": jnp.stack(b_enc),
            "W_dec": jnp.broadcast_to(dec, (m,) + dec.shape)}


def fitted_scale(src_c, tgt_c, enc, bias, dec, k: int, valid):
    """The s > 0 for which s * ReLU(TopK(enc src_c + bias)) dec reconstructs the centred
    outputs best (least squares; the top k does not depend on s)."""
    vals, idx = lax.top_k(src_c @ enc.T + bias, k)
    r = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), dec[idx]) * valid[:, None]
    s = jnp.sum(tgt_c * r) / jnp.maximum(jnp.sum(r * r), 1e-30)
    return jnp.where(s > 0, s, 1.0)


class TranscoderFamily(VectorFamily):
    """transcoder: FVU of the MLP's output from a top-k code of its input."""

    recipe = TranscoderRecipe()

    def module(self, rngs):
        return Transcoder(self.model, rngs=rngs)

    def loss_terms(self, out, hp):
        return LossTerms(out.fvu)

    def fired(self, out, w):
        if out.code is not None:
            return super().fired(out, w)
        return losses.fired_units(out.indices, out.values, w, self.model.latents)

    def target_columns(self) -> slice:
        return slice(self.model.d_in, None)

    def eval_sums(self, out, x, w):
        sse = squared_error(out.recon, split(self.model, x)[1], w)
        if out.code is not None:
            return {"sse": sse, "counts": jnp.sum((out.code > 0) * w[:, None], axis=0)}
        on = (out.values > 0) * w[:, None]
        counts = jnp.zeros(self.model.latents).at[out.indices.reshape(-1)].add(on.reshape(-1))
        return {"sse": sse, "counts": counts}

    def input_scale(self, rows) -> float:
        return 1.0

    def mse_unit(self, scale):
        return 1.0

    def code(self, out):
        if out.code is not None:
            return out.code
        rows = jnp.arange(out.indices.shape[0])[:, None]
        return jnp.zeros((out.indices.shape[0], self.model.latents),
                         out.values.dtype).at[rows, out.indices].add(out.values)

    def decode(self, params, code):
        """The code's part of the output (b_dec included, the skip map's not: it needs x)."""
        return code @ params["W_dec"] + params["b_dec"]

    def usage(self, out, hp, max_k):
        if out.code is not None:
            return jnp.sum(out.code > 0, axis=0).astype(jnp.float32)
        member = jnp.broadcast_to(jnp.arange(max_k) < hp["k"], out.indices.shape)
        return jnp.zeros(self.model.latents).at[out.indices.reshape(-1)].add(member.reshape(-1))


class Transcoders(VectorSAE):
    """Transcoders for inference: inputs are MLP inputs (N, d); `transcode` gives the MLP
    outputs' reconstructions (skip map included); each model is named by its k."""

    def _inputs(self, x) -> np.ndarray:
        from ksae_jax.models.loaded import as_rows
        src = as_rows(x, self.model_config.d_in, "inputs", "f")
        return np.concatenate([src, np.zeros_like(src)], axis=1)  # the target half is unread

    def transcode(self, x, *label, **named) -> np.ndarray:
        """(N, d) reconstructions of the MLP's outputs from its inputs x (N, d)."""
        i = self.index(*label, **named)
        x, (hp, k) = self._inputs(x), self.hp(i)
        outs = [forward_jit(self._params(i), x[j:j + CHUNK], hp, family=self.family, max_k=k)
                for j in range(0, len(x), CHUNK)]
        if not outs:
            return np.zeros((0, self.model_config.d_in), np.float32)
        return np.concatenate([np.asarray(o.recon) for o in outs])

    reconstruct = transcode  # (reconstruct_array, as the splice calls it, takes pair rows)

    def sparsify_fields(self) -> dict | None:
        if self.model_config.activation != "topk":
            return None
        return {"normalize_decoder": False, "multi_topk": False, "transcode": True}

    def saelens_view(self, *label, **named):
        """SAELens's jumprelu transcoders (skip or not) hold a BatchTopK transcoder served with
        its threshold; SAELens has no TopK transcoder (ValueError)."""
        mc = self.model_config
        if mc.activation != "batchtopk":
            raise ValueError("SAELens has no TopK transcoder (its transcoders are ReLU or "
                             "JumpReLU): train with --activation batchtopk to export to it, or "
                             "use --format sparsify")
        kind = "jumprelu_skip_transcoder" if mc.skip else "jumprelu_transcoder"
        return kind, None, self.params_for(*label, **named)["threshold"]

    def saelens_fields(self) -> dict:
        return {"apply_b_dec_to_input": False, "d_out": self.model_config.d_in}


register("transcoder", TranscoderModel, TranscoderFamily, Transcoders)
register("skip-transcoder", TranscoderModel, TranscoderFamily, Transcoders)
