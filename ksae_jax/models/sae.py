"""The TopK family: sparse autoencoders of vectors (Gao et al. 2024),
z = ReLU(TopK(W_enc (x - b_dec) + b_enc)), x_hat = W_dec^T z + b_dec, as a Flax NNX module;
its one forward pass (reconstruction, kept latents, FVU, Multi-TopK and AuxK terms), the
recipe around the update (unit-norm decoder rows, the gradient projection, b_dec at the
mean or geometric median of the data) and `VectorSAE`, the trained models for inference.

W_enc and W_dec are both stored (n, d), one row per latent (sparsify's layout), so the sparse
paths move whole rows. The decoder rows start along training rows mixed with random unit
vectors (init_dirs), W_enc as W_dec times a scale fitted to each k (init_scale "fit").
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ksae_jax import losses, native_ops, recipe, sharding, sparse_ops
from ksae_jax.config import SaeModel
from ksae_jax.data.feed import Rows
from ksae_jax.data.vectors import VectorSource, normalizing_scale, open_vectors
from ksae_jax.models.family import Family
from ksae_jax.models.layers import matmul
from ksae_jax.models.loaded import CHUNK, Loaded, as_rows, forward_jit, reconstruct_jit
from ksae_jax.topk import top_k

SPARSE_MAX_DENSITY = 1 / 16  # "auto": sparse paths while k / n is below this
MULTI_TOPK_FACTOR, MULTI_TOPK_WEIGHT = 4, 1 / 8
MEDIAN_ROWS = 32_768  # training rows the geometric median of b_dec is taken over
FIT_ROWS = 4096       # ... of which the fitted init scale sees these


class SaeOutput(NamedTuple):
    """One forward pass of a TopK SAE on a batch (sparsify's ForwardOutput, in JAX)."""

    recon: jax.Array
    """(B, d) reconstruction, b_dec included."""
    values: jax.Array
    """(B, K) kept activations after ReLU (0 beyond the model's k)."""
    indices: jax.Array
    """(B, K) the latents they belong to."""
    pre: jax.Array
    """(B, n) encoder matmul without b_enc, without gradient (it selects the latents)."""
    fvu: jax.Array | None = None
    """Fraction of variance unexplained over the batch's real rows."""
    multi_topk_fvu: jax.Array | None = None
    """FVU of the reconstruction from the top 4k latents (Multi-TopK; None when off)."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead latents (None without a dead mask)."""


def sparse_path(cfg: SaeModel, k: int) -> str:
    """How this model's gathers and scatters run: "dense" (plain products), "sparse" (the
    custom VJPs on XLA ops) or "native" (the same on native_ops' CPU kernels). cfg.decoder
    forces one; "auto" takes dense while k / n is too large for gathers and scatters to win,
    else native where the kernels serve this process, else sparse."""
    if cfg.decoder == "native" and (why := native_ops.unavailable()):
        raise ValueError(f"decoder 'native': {why}")
    if cfg.decoder != "auto":
        return cfg.decoder
    if k > SPARSE_MAX_DENSITY * cfg.hidden:
        return "dense"
    return "sparse" if native_ops.unavailable() else "native"


def squared_error(recon, x, w):
    """Squared error summed over the real rows."""
    return jnp.sum(jnp.square(recon - x).reshape(x.shape[0], -1).sum(-1) * w)


class TopKSAE(nnx.Module):
    def __init__(self, cfg: SaeModel, *, rngs: nnx.Rngs):
        rows = jax.random.normal(rngs.params(), (cfg.hidden, cfg.d_in), jnp.float32)
        rows = rows / jnp.linalg.norm(rows, axis=1, keepdims=True)
        scale = 1.0 if cfg.init_scale == "fit" else cfg.init_scale  # "fit": set from the data
        self.W_enc = nnx.Param(rows * scale if scale != 1 else rows)
        self.b_enc = nnx.Param(jnp.zeros((cfg.hidden,), jnp.float32))
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

    def __call__(self, x, w, k, max_k: int, *, dead=None, aux_k=None, terms=True) -> SaeOutput:
        """Keeps max_k latents per vector, of which the first k (traced); with terms, the
        top 4 max_k for Multi-TopK when the model has it, and AuxK when `dead` is given."""
        multi = self.cfg.multi_topk and terms
        width = max_k * (MULTI_TOPK_FACTOR if multi else 1)
        path = sparse_path(self.cfg, width)
        pre = self.preacts(x)
        top, idx = self.select(pre, width, path=path)
        values = jax.nn.relu(self.kept_values(top, x, idx, path))
        rank = jnp.arange(width)
        main = jnp.where(rank[:max_k] < k, values[:, :max_k], 0.0)
        recon = self.decode_sparse(main, idx[:, :max_k], path) + self.b_dec[...]
        out = SaeOutput(recon, main, idx[:, :max_k], pre)
        if not terms:
            return out
        denom = losses.total_variance(x, w)
        out = out._replace(fvu=losses.fvu(recon, x, w, denom))
        if multi:
            kept = jnp.where(rank < MULTI_TOPK_FACTOR * k, values, 0.0)
            out = out._replace(multi_topk_fvu=losses.fvu(
                self.decode_sparse(kept, idx, path) + self.b_dec[...], x, w, denom))
        if dead is not None:
            out = out._replace(auxk=self.auxk(pre, x, w, recon, dead, aux_k, denom, path))
        return out

    def auxk(self, pre, x, w, recon, dead, aux_k: int, denom, path: str):
        """AuxK: the aux_k largest pre-activations among the dead latents decode the residual."""
        def select_dead(dead):
            masked, ids = self.select(pre, aux_k, dead, path)
            vals = jax.nn.relu(self.kept_values(masked, x, ids, path))
            return jnp.where(dead[ids], vals, 0.0), ids

        def decode_dead(values, ids):
            return self.decode_sparse(values, ids, path)

        return losses.auxk_loss(select_dead, decode_dead, x, w, recon, dead, aux_k, denom)


class TopKFamily(Family):
    """topk: float vectors in, FVU (+ Multi-TopK / 8) (+ aux_coef * AuxK) out."""

    unit = "vectors"
    rec_name = "fvu"
    progress_names = ("fvu", "dead")
    shards_latents = True

    def module(self, rngs):
        return TopKSAE(self.model, rngs=rngs)

    def data_sample(self, rows, cfg, mesh=None):
        """{"x", "valid", "order"}: up to MEDIAN_ROWS training rows drawn with cfg.seed (in row order),
        as one array split over the mesh's devices (padded with invalid rows to a multiple
        of them: the same rows on every mesh); each process reads only its own share."""
        count = min(rows.n, MEDIAN_ROWS)
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(rows.n)[:count])
        devices = 1 if mesh is None else mesh.size
        per = -(-count // devices) * devices // jax.process_count()
        mine = pick[jax.process_index() * per:(jax.process_index() + 1) * per]
        x = np.zeros((per if mesh is not None else count, rows.row_shape[0]), np.float32)
        x[:len(mine)] = rows.take(mine) * np.float32(rows.scale)
        valid = np.arange(len(x)) < len(mine)
        order = np.full(len(x), np.inf, np.float32)  # init_dirs: a priority per row, seeded
        start = jax.process_index() * per
        order[:len(mine)] = np.random.default_rng(cfg.seed + 1).random(count)[start:start + len(mine)]
        return {"x": sharding.global_rows(x, mesh), "valid": sharding.global_rows(valid, mesh),
                "order": sharding.global_rows(order, mesh)}

    def init_from_data(self, params, sample, cfg):
        """b_dec = the geometric median (or the mean) of the sample, or zero; with init_dirs
        "data", the decoder rows along sample rows (the same for every model); with init_scale
        "fit", each model's encoder scale fitted to its first reconstructions of the sample's
        first rows (recipe.fitted_encoder_scale); with b_enc_init "balanced", each model's b_enc
        from its k and b_enc_mean_keep (recipe.balanced_bias) on those rows."""
        mc, x, valid = self.model, sample["x"], sample["valid"]
        fit = min(FIT_ROWS, cfg.batch_size)  # the fits see no more rows than a step's batch
        if mc.b_dec_init != "zero":
            w = valid.astype(jnp.float32)
            center = (recipe.geometric_median(x, valid) if mc.b_dec_init == "median"
                      else (w @ x) / jnp.maximum(w.sum(), 1.0))
            params = {**params, "b_dec": jnp.broadcast_to(center, params["b_dec"].shape)}
        if mc.init_dirs != "random":
            x_c, order = x - params["b_dec"][0], sample["order"]
            if mc.init_dirs == "diverse":
                order = recipe.diverse_priority(x_c, order)
            rows = recipe.data_directions(x_c, order, mc.hidden,
                                          jax.random.key(cfg.seed),
                                          noise=mc.init_mix if mc.init_dirs == "mixed" else 0.0)
            scale = 1.0 if mc.init_scale == "fit" else mc.init_scale
            params = {**params, "W_dec": jnp.broadcast_to(rows, params["W_dec"].shape),
                      "W_enc": jnp.broadcast_to(rows * scale, params["W_enc"].shape)}
        centred = [x[:fit] - params["b_dec"][m] for m in range(len(cfg.max_ks))]
        if mc.init_scale == "fit":
            scales = [recipe.fitted_encoder_scale(centred[m], params["W_dec"][m], k, valid[:fit])
                      for m, k in enumerate(cfg.max_ks)]
            params = {**params, "W_enc": params["W_dec"] * jnp.stack(scales)[:, None, None]}
        if mc.b_enc_init != "zero":
            params = {**params, "b_enc": jnp.stack([
                recipe.balanced_bias(centred[m], params["W_enc"][m], k, valid[:fit],
                                     mean_keep=mc.b_enc_mean_keep)
                for m, k in enumerate(cfg.max_ks)])}
        return params

    def loss(self, params, batch, hp, dead, *, cfg, max_k):
        x, w = batch["x"], batch["w"]
        out = self.forward(params, x, w, hp["k"], max_k, dead=dead if cfg.aux_coef else None,
                           aux_k=cfg.aux_k)
        loss = out.fvu
        if out.multi_topk_fvu is not None:
            loss += MULTI_TOPK_WEIGHT * out.multi_topk_fvu
        if cfg.aux_coef:
            loss += cfg.aux_coef * out.auxk
        return loss, {"loss": loss, "rec": out.fvu, "fired": self.fired(out, w)}

    def fired(self, out, w):
        """(n,) bool: latents with a positive kept value on a real row of the batch."""
        return losses.fired_units(out.indices, out.values, w, self.model.hidden)

    def eval_sums(self, out, x, w):
        on = (out.values > 0) * w[:, None]
        counts = jnp.zeros(self.model.hidden).at[out.indices.reshape(-1)].add(on.reshape(-1))
        return {"sse": squared_error(out.recon, x, w), "counts": counts}

    def project_grads(self, params, grads):
        """The decoder rows' gradient without its component along the rows."""
        return {**grads, "W_dec": recipe.remove_parallel_component(params["W_dec"], grads["W_dec"])}

    def post_update(self, new, old, keep, metrics):
        """Unit decoder rows again; a frozen model's rows are left bit for bit."""
        return {**new, "W_dec": jnp.where(keep, recipe.unit_norm_rows(new["W_dec"]), old["W_dec"])}

    def resample(self, params, dirs, dead):
        """The `dead` latents reborn along `dirs` (unit rows): their decoder rows dirs, their
        encoder rows dirs at the live encoder rows' mean norm, their b_enc 0."""
        live = (~dead).astype(jnp.float32)
        norms = jnp.linalg.norm(params["W_enc"], axis=-1)
        norm = jnp.sum(norms * live) / jnp.maximum(live.sum(), 1)
        rows = dead[:, None]
        return {**params, "W_dec": jnp.where(rows, dirs, params["W_dec"]),
                "W_enc": jnp.where(rows, norm * dirs, params["W_enc"]),
                "b_enc": jnp.where(dead, 0.0, params["b_enc"])}

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
        rows = jnp.arange(out.indices.shape[0])[:, None]
        return jnp.zeros((out.indices.shape[0], self.model.hidden),
                         out.values.dtype).at[rows, out.indices].add(out.values)

    def decode(self, params, code):
        return code @ params["W_dec"] + params["b_dec"]

    def usage(self, out, k, max_k):
        member = jnp.broadcast_to(jnp.arange(max_k) < k, out.indices.shape)
        return jnp.zeros(self.model.hidden).at[out.indices.reshape(-1)].add(member.reshape(-1))


class VectorSAE(Loaded):
    """TopK SAEs on (N, d) vectors. Inputs are scaled by the stored normalisation constant
    (input_scale) before encoding and outputs scaled back, so callers never see it."""

    family_class = TopKFamily

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self._on_device: dict[int, dict] = {}  # params of each k, put once for reconstruct_array

    def _inputs(self, x) -> np.ndarray:
        return as_rows(x, self.model_config.d_in, "inputs", "f") * np.float32(self.input_scale)

    def encode_topk(self, x, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, indices), each (N, k): the kept latents of every vector."""
        p, x, k = self.params_for(k), self._inputs(x), self._k(k)
        if len(x) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int32)
        outs = [forward_jit(p, x[i:i + CHUNK], jnp.int32(k), family=self.family, max_k=k)
                for i in range(0, len(x), CHUNK)]
        return (np.concatenate([np.asarray(o.values) for o in outs]),
                np.concatenate([np.asarray(o.indices) for o in outs]))

    def reconstruct_array(self, x: jax.Array, k=None) -> jax.Array:
        """Reconstructions of the rows of a JAX array (e.g. from DLPack) on its device: no
        host copy and no input checks (the caller's array is trusted)."""
        if k not in self._on_device:
            self._on_device[k] = jax.device_put(self.params_for(k))
        kk = self._k_of(k)
        return reconstruct_jit(self._on_device[k], x, jnp.int32(kk), jnp.float32(self.input_scale),
                               family=self.family, max_k=kk)

    def saelens_view(self, k=None) -> tuple[str, int | None, np.ndarray | None]:
        """(SAELens architecture, its k, its threshold) of the model named k."""
        return "topk", self._k(k), None

    def decoder_directions(self, k=None) -> np.ndarray:
        """(n, d) unit decoder rows of the model of k (in normalised input space)."""
        return np.asarray(self.params_for(k)["W_dec"])
