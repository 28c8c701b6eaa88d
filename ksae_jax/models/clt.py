"""The cross-layer transcoder family (CLT; Anthropic's circuit tracing, 2025): one encoder per
layer l reading the MLP's input there, whose latents write to the MLP outputs of that layer
and of every later one:

    z_l = ReLU(TopK(W_enc[l] x_l + b_enc[l])),
    y_hat_m = sum_{l <= m} W_dec[l -> m]^T z_l + b_dec[m],

trained on the mean over layers of each layer's output FVU (+ AuxK: each layer's dead
latents reconstruct that layer's residual through their own-layer decoder). A training row
holds every layer's pair [x_0 | y_0 | x_1 | y_1 | ...] (the live hookpoint mlp.0+1+...).

Parameters are stored latent-first, so that the mesh's latent axis splits every layer's
latents alike: W_enc (n, L, d), b_enc (n, L), W_dec (n, P, d) with one slot per (l, m), l <= m
(P = L (L + 1) / 2, `pair_index`), b_dec (L, d). The code's units are latent-major
(unit i L + l is latent i of layer l). The sweep's k (per layer) is traced. Registered as
arch "clt"."""
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

from ksae_jax import checks, losses, sparse_ops
from ksae_jax.models.family import LossTerms, ModelConfig
from ksae_jax.models.layers import matmul
from ksae_jax.models.registry import register
from ksae_jax.models.topk import sparse_path
from ksae_jax.models.transcoder import ENCODER_NORM
from ksae_jax.models.vector import VectorFamily, VectorSAE, check_widths, squared_error
from ksae_jax.recipe import VectorRecipe, balanced_bias, unit_norm_rows
from ksae_jax.topk import top_k


@dataclasses.dataclass(frozen=True)
class CLTModel(ModelConfig):
    """A cross-layer transcoder over n_layers consecutive MLPs of width d_in."""

    d_in: int
    """Width of each MLP's input and output."""
    n_layers: int | None = None
    """Layers spanned (a row holds each one's [input | output]); set from the hookpoint
    in a live run."""
    latents: int | None = None
    """Latents per layer; None: 8 * d_in."""
    arch: Literal["clt"] = "clt"
    """The family."""
    activation: Literal["topk", "batchtopk"] = "topk"
    """"topk": each layer of each row keeps its k largest latents; "batchtopk": a batch of B
    rows keeps the B k L largest activations over every layer (crosslayer-coding's two
    choices), served as a JumpReLU with one threshold estimated in training."""
    threshold_lr: float = 0.01
    """batchtopk: the served threshold moves this fraction of the way to each training
    batch's smallest kept activation."""
    decoder: Literal["auto", "native", "sparse", "dense"] = "auto"
    """How the top-k gathers and scatters run (as TopK SAEs' decoder setting)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the dense matmuls (float32 accumulation)."""
    aux_coef: float = dataclasses.field(default=1 / 32, kw_only=True)
    """Weight of the AuxK loss that revives dead latents (0: off)."""

    default_sweep: ClassVar[tuple] = (16, 32, 64, 128)
    training_defaults: ClassVar[dict] = {"batch_size": 4096, "seed": 0, "adam_eps": 6.25e-10}
    normalize: ClassVar[bool] = False

    def __post_init__(self):
        if self.n_layers is None:
            raise ValueError("n_layers: give the number of layers the CLT spans")
        check_widths(self, ("d_in", "n_layers"))
        checks.choice(self, "arch", "activation", "decoder", "dtype")
        checks.fraction("threshold_lr", self.threshold_lr, low_open=True)
        if self.threshold_lr != 0.01 and self.activation != "batchtopk":
            raise ValueError("threshold_lr: only the batchtopk activation has a threshold")
        if self.aux_k is None:  # per layer
            object.__setattr__(self, "aux_k", min(max(self.d_in // 2, 1), self.latents))
        super().__post_init__()

    @staticmethod
    def hookpoints_for(layers) -> tuple[str, ...]:
        """The one hookpoint a CLT over these layers reads: every MLP's pair, mlp.0+1+..."""
        return ("mlp." + "+".join(str(layer) for layer in layers),)

    @staticmethod
    def check_hookpoint(name: str) -> None:
        if not re.fullmatch(r"mlp\.\d+(\+\d+)+", name):
            raise ValueError(f"hookpoint {name}: a CLT reads several layers' MLP inputs and "
                             "outputs (--layers L1 L2 ...)")
        layers = [int(p) for p in name.split(".", 1)[1].split("+")]
        if layers != sorted(set(layers)):
            raise ValueError(f"--layers {' '.join(map(str, layers))}: a CLT's layers must "
                             "increase (a latent writes to its own layer's MLP and each later "
                             "layer's)")

    @classmethod
    def width_fields(cls, width: int, hookpoint: str | None = None) -> dict:
        if hookpoint is None:
            raise ValueError("a CLT's rows hold every layer's MLP pair: train it live "
                             "(--model ... --layers L1 L2 ...)")
        layers = len(hookpoint.split(".", 1)[1].split("+"))
        if width % (2 * layers):
            raise ValueError(f"rows of width {width} are not {layers} layers' pairs")
        return {"d_in": width // (2 * layers), "n_layers": layers}

    @property
    def units(self) -> int:
        return self.latents * self.n_layers

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (2 * self.n_layers * self.d_in,)

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(source, target) layers of the decoder slots, in order."""
        return [(l, m) for l in range(self.n_layers) for m in range(l, self.n_layers)]

    def default_lr(self) -> float:
        return 2e-4 / math.sqrt(self.latents / 2 ** 14)


def pair_index(cfg: CLTModel, source: int, target: int) -> int:
    return cfg.pairs.index((source, target))


def split(cfg: CLTModel, x):
    """(sources, targets), each (B, L, d), from rows of every layer's pair."""
    pairs = x.reshape(x.shape[0], cfg.n_layers, 2, cfg.d_in)
    return pairs[:, :, 0], pairs[:, :, 1]


class CLTOutput(NamedTuple):
    """One forward pass of a CLT."""

    recon: jax.Array
    """(B, L d) every layer's output reconstructed."""
    values: jax.Array | None
    """topk: (B, L, K) kept activations per layer (0 beyond the model's k)."""
    indices: jax.Array | None
    """topk: (B, L, K) the latents they belong to."""
    code: jax.Array | None = None
    """batchtopk: (B, L, n) kept activations (0 elsewhere)."""
    min_kept: jax.Array | None = None
    """batchtopk: the batch's smallest kept activation (moves the threshold)."""
    fvu: jax.Array | None = None
    """Mean over layers of each layer's output FVU."""
    layer_fvu: jax.Array | None = None
    """(L,) each layer's output FVU."""
    auxk: jax.Array | None = None
    """Mean over layers of AuxK (None without a dead mask)."""


class CLT(nnx.Module):
    def __init__(self, cfg: CLTModel, *, rngs: nnx.Rngs):
        n, L, d = cfg.latents, cfg.n_layers, cfg.d_in
        enc = jax.random.normal(rngs.params(), (n, L, d), jnp.float32)
        dec = jax.random.normal(rngs.params(), (n, len(cfg.pairs), d), jnp.float32)
        self.W_enc = nnx.Param(unit_norm_rows(enc) * ENCODER_NORM)
        self.b_enc = nnx.Param(jnp.zeros((n, L), jnp.float32))
        self.W_dec = nnx.Param(unit_norm_rows(dec))
        self.b_dec = nnx.Param(jnp.zeros((L, d), jnp.float32))
        if cfg.activation == "batchtopk":
            self.threshold = nnx.Param(jnp.zeros((), jnp.float32))  # moved by the recipe only
        self.cfg = cfg

    def encode(self, src, layer: int, k, max_k: int, path: str, dead=None):
        """(values, indices) of one layer's top max_k latents (the first k kept), among the
        `dead` ones only when a mask is given; values differentiable in the encoder."""
        W, b = self.W_enc[...][:, layer], self.b_enc[...][:, layer]
        pre = matmul(src, lax.stop_gradient(W).T, self.cfg.dtype)
        bias = lax.stop_gradient(b) if dead is None else jnp.where(dead, lax.stop_gradient(b),
                                                                    -jnp.inf)
        top, idx = top_k(pre, max_k, bias, native=path == "native")
        fn = sparse_ops.dense_preacts if path == "dense" else sparse_ops.sparse_preacts
        values = jax.nn.relu(fn(lax.stop_gradient(top), src, W, b, jnp.zeros_like(src[0]), idx,
                                path == "native"))
        keep = jnp.arange(max_k) < k if dead is None else dead[idx]
        return jnp.where(keep, values, 0.0), idx

    def decode(self, values, idx, source: int, target: int, path: str):
        """What layer `source`'s kept latents write to layer `target`'s output."""
        W = self.W_dec[...][:, pair_index(self.cfg, source, target)]
        fn = sparse_ops.dense_decode if path == "dense" else sparse_ops.sparse_decode
        return fn(values, idx, W, path == "native")

    def batch_top_k(self, src, w, k, terms: bool) -> CLTOutput:
        """The batch's B k L largest activations over every layer in training, the
        threshold's otherwise; dense codes and decoders."""
        from ksae_jax.models.batchtopk import batch_keep
        cfg, B = self.cfg, src.shape[0]
        pre = (jnp.einsum("bld,nld->bln", src, self.W_enc[...]) + self.b_enc[...].T)
        acts = jax.nn.relu(pre)
        keep = (lax.stop_gradient(batch_keep(lax.stop_gradient(acts).reshape(B, -1), w,
                                             k * cfg.n_layers)).reshape(acts.shape)
                if terms else pre > self.threshold[...])
        code = jnp.where(keep, acts, 0.0)
        recon = jnp.stack([self.b_dec[...][m] + sum(
            matmul(code[:, l], self.W_dec[...][:, pair_index(cfg, l, m)], cfg.dtype)
            for l in range(m + 1)) for m in range(cfg.n_layers)], axis=1)
        min_kept = jnp.min(jnp.where(keep, lax.stop_gradient(acts), jnp.inf))
        return CLTOutput(recon.reshape(B, -1), None, None, code, min_kept)

    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> CLTOutput:
        cfg = self.cfg
        src, tgt = split(cfg, x)
        if cfg.activation == "batchtopk":
            path = sparse_path(cfg, cfg.aux_k)
            out = self.batch_top_k(src, w, hp["k"], terms)
        else:
            path = sparse_path(cfg, max_k)
            codes = [self.encode(src[:, l], l, hp["k"], max_k, path)
                     for l in range(cfg.n_layers)]
            recon = jnp.stack([self.b_dec[...][m] + sum(
                self.decode(*codes[l], l, m, path) for l in range(m + 1))
                for m in range(cfg.n_layers)], axis=1)
            out = CLTOutput(recon.reshape(x.shape[0], -1), jnp.stack([c[0] for c in codes], 1),
                            jnp.stack([c[1] for c in codes], 1))
        recon = out.recon.reshape(tgt.shape)
        if not terms:
            return out
        denoms = [losses.total_variance(tgt[:, m], w) for m in range(cfg.n_layers)]
        layer_fvu = jnp.stack([losses.fvu(recon[:, m], tgt[:, m], w, denoms[m])
                               for m in range(cfg.n_layers)])
        out = out._replace(fvu=layer_fvu.mean(), layer_fvu=layer_fvu)
        if dead is not None:
            out = out._replace(auxk=self.auxk(src, tgt, w, recon, dead, denoms, path))
        return out

    def auxk(self, src, tgt, w, recon, dead, denoms, path):
        """Mean over layers: each layer's dead latents (its top aux_k) reconstruct that
        layer's residual through their own-layer decoder."""
        cfg = self.cfg
        dead = dead.reshape(cfg.latents, cfg.n_layers)
        terms = []
        for l in range(cfg.n_layers):
            def select_dead(mask, l=l):
                return self.encode(src[:, l], l, None, cfg.aux_k, path, dead=mask)

            terms.append(losses.auxk_loss(
                select_dead, lambda v, i, l=l: self.decode(v, i, l, l, path), tgt[:, l], w,
                recon[:, l], dead[:, l], cfg.aux_k, denoms[l]))
        return jnp.stack(terms).mean()


class CLTRecipe(VectorRecipe):
    """Each layer's encoder and own-layer decoder started as the transcoders' "paired" init
    (latent i along training pair i of that layer; b_enc firing it on about k/n of the
    rows), own-layer decoder rows kept at unit norm; the cross-layer decoders start at zero,
    their norms free (a latent writes to later layers as much as they need). b_dec: each
    layer's mean output."""

    def init_from_data(self, params, sample, cfg):
        from ksae_jax.models.transcoder import fitted_scale
        from ksae_jax.recipe import FIT_ROWS
        mc, valid = cfg.model, sample["valid"]
        src, tgt = split(mc, sample["x"])
        wts = valid.astype(jnp.float32)
        mean_src = jnp.einsum("b,bld->ld", wts, src) / jnp.maximum(wts.sum(), 1.0)
        mean_tgt = jnp.einsum("b,bld->ld", wts, tgt) / jnp.maximum(wts.sum(), 1.0)
        idx = jnp.argsort(sample["order"])[jnp.arange(mc.latents) % jnp.sum(valid)]
        fit = min(FIT_ROWS, cfg.batch_size)
        W_enc, b_enc = [], []
        W_dec = jnp.zeros_like(params["W_dec"][0])
        for l in range(mc.n_layers):
            s_c, t_c = src[:, l] - mean_src[l], tgt[:, l] - mean_tgt[l]
            enc, dec = unit_norm_rows(s_c[idx]), unit_norm_rows(t_c[idx])
            W_dec = W_dec.at[:, pair_index(mc, l, l)].set(dec)
            per_model = []
            for k in cfg.max_ks:
                bias = balanced_bias(s_c[:fit], enc, k, valid[:fit])
                s = fitted_scale(s_c[:fit], t_c[:fit], enc, bias, dec, k, valid[:fit])
                per_model.append((s * enc, s * (bias - enc @ mean_src[l])))
            W_enc.append(jnp.stack([e for e, _ in per_model]))
            b_enc.append(jnp.stack([b for _, b in per_model]))
        m = len(cfg.max_ks)
        return {**params, "W_enc": jnp.stack(W_enc, axis=2), "b_enc": jnp.stack(b_enc, axis=2),
                "W_dec": jnp.broadcast_to(W_dec, (m,) + W_dec.shape),
                "b_dec": jnp.broadcast_to(mean_tgt, params["b_dec"].shape)}

    def project_grads(self, params, grads, model):
        """The own-layer decoder rows' gradient without its component along the rows."""
        from ksae_jax.recipe import remove_parallel_component
        own = own_slots(model)[:, None]
        g = grads["W_dec"]
        return {**grads, "W_dec": jnp.where(own, remove_parallel_component(params["W_dec"], g), g)}

    def resample_every(self, model) -> int:
        return 0

    def post_update(self, new, old, keep, out, model):
        """Own-layer decoder rows at unit norm again; batchtopk's threshold estimate."""
        from ksae_jax.models.batchtopk import moved_threshold
        W = new["W_dec"]
        new = {**new, "W_dec": jnp.where(keep & own_slots(model)[:, None], unit_norm_rows(W), W)}
        if model.activation == "batchtopk":
            new = {**new, "threshold": moved_threshold(old["threshold"], out.min_kept, keep,
                                                       model.threshold_lr)}
        return new


def own_slots(model: CLTModel) -> jax.Array:
    """(P,) whether each decoder slot writes to its own layer (l -> l)."""
    return jnp.asarray([l == m for l, m in model.pairs])


class CLTFamily(VectorFamily):
    """clt: every layer's output reconstructed from the top k latents of each layer up to it."""

    recipe = CLTRecipe()

    def module(self, rngs):
        return CLT(self.model, rngs=rngs)

    def loss_terms(self, out, hp):
        return LossTerms(out.fvu)

    def unit_ids(self, out):
        """(B, L, K) code units (latent-major: latent i of layer l is unit i L + l)."""
        return out.indices * self.model.n_layers + jnp.arange(self.model.n_layers)[:, None]

    def fired(self, out, w):
        if out.code is not None:
            return jnp.any((self.code(out) > 0) & (w[:, None] > 0), axis=0)
        return losses.fired_units(self.unit_ids(out).reshape(w.shape[0], -1),
                                  out.values.reshape(w.shape[0], -1), w, self.model.units)

    def target_columns(self):
        d = self.model.d_in
        return np.concatenate([np.arange(d) + (2 * l + 1) * d for l in range(self.model.n_layers)])

    def eval_sums(self, out, x, w):
        B, (_, tgt) = w.shape[0], split(self.model, x)
        if out.code is not None:  # (B, L, n)
            on = (out.code > 0) * w[:, None, None]
            counts = on.sum(0).T.reshape(-1)  # latent-major units
        else:
            on = (out.values > 0) * w[:, None, None]
            counts = jnp.zeros(self.model.units).at[self.unit_ids(out).reshape(-1)].add(
                on.reshape(-1))
        err = jnp.square(out.recon.reshape(tgt.shape) - tgt) * w[:, None, None]
        return {"sse": squared_error(out.recon, tgt.reshape(B, -1), w), "counts": counts,
                "layer_sq_err": err.sum((0, 2)), "layer_l0": on.sum((0, 2)),
                "layer_sq": jnp.einsum("b,bld->l", w, jnp.square(tgt)),
                "layer_sum": jnp.einsum("b,bld->ld", w, tgt)}

    def held_out_extras(self, sums, n, denom):
        """layer_fvu (each layer's output FVU) and layer_l0 (latents kept per row, per layer)."""
        var = sums["layer_sq"] - np.square(sums["layer_sum"]).sum(-1) / n
        return {"layer_fvu": sums["layer_sq_err"] / np.maximum(var, 1e-30),
                "layer_l0": sums["layer_l0"] / n}

    def input_scale(self, rows) -> float:
        return 1.0

    def mse_unit(self, scale):
        return 1.0

    def code(self, out):
        if out.code is not None:  # (B, L, n) -> latent-major units
            return jnp.swapaxes(out.code, 1, 2).reshape(out.code.shape[0], -1)
        B = out.indices.shape[0]
        ids = self.unit_ids(out).reshape(B, -1)
        return jnp.zeros((B, self.model.units), out.values.dtype).at[
            jnp.arange(B)[:, None], ids].add(out.values.reshape(B, -1))

    def decode(self, params, code):
        """Every layer's output (B, L d) from a (B, units) code."""
        mc = self.model
        z = code.reshape(code.shape[0], mc.latents, mc.n_layers)
        return jnp.concatenate([params["b_dec"][m] + sum(
            z[:, :, l] @ params["W_dec"][:, pair_index(mc, l, m)] for l in range(m + 1))
            for m in range(mc.n_layers)], axis=-1)

    def usage(self, out, hp, max_k):
        if out.code is not None:
            return jnp.sum(self.code(out) > 0, axis=0).astype(jnp.float32)
        member = jnp.broadcast_to(jnp.arange(max_k) < hp["k"], out.indices.shape)
        return jnp.zeros(self.model.units).at[self.unit_ids(out).reshape(-1)].add(
            member.reshape(-1).astype(jnp.float32))


class CLTs(VectorSAE):
    """CLTs for inference: rows are every layer's [input | output] pairs (the outputs are not
    read); `reconstruct` gives every layer's output (N, L d). Named by k."""

    def _inputs(self, x) -> np.ndarray:
        from ksae_jax.models.loaded import as_rows
        return as_rows(x, self.model_config.input_width, "inputs", "f")

    def reconstruct(self, x, *label, **named) -> np.ndarray:
        return np.asarray(self.reconstruct_array(self._inputs(x), *label, **named))


register("clt", CLTModel, CLTFamily, CLTs)
