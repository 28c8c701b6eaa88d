"""The training recipes: the steps around the optimizer update, apart from the families'
maths. `Recipe` (the image models: none) and `VectorRecipe` (the SAEs on vectors: b_dec, the
decoder's directions, the encoder's scale and b_enc initialised from training rows; the
decoder rows kept at unit norm by projecting their gradient and renormalising them; dead
latents resampled) are the hooks the train step calls; below them, the pieces each is made of,
small pure functions: unit-norm rows, the gradient projection, dead-latent counters, the
geometric median, the fitted encoder scale, the balanced b_enc, data directions."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ksae_jax import sharding

COUNTER_CAP = 2 ** 30  # counters saturate here (int32), far above any dead_tokens
MEDIAN_ROWS = 32_768  # training rows the b_dec init (mean or geometric median) is taken over
FIT_ROWS = 4096       # ... of which the fitted init scale and the balanced b_enc see these


class Recipe:
    """The hooks of a training recipe, in the order the train step calls them; this one
    changes nothing (the image models train with the optimizer alone)."""

    def data_sample(self, rows, cfg, mesh=None):
        """The training rows init_from_data reads, as arrays (None: it reads none)."""
        del rows, cfg, mesh

    def init_from_data(self, params: dict, sample, cfg) -> dict:
        """Stacked fresh params (one per model of the sweep cfg) with what is initialised from
        the sample of training rows set (traced: runs inside the jitted init)."""
        del sample, cfg
        return params

    def project_grads(self, params: dict, grads: dict, model) -> dict:
        del model
        return grads

    def post_update(self, new: dict, old: dict, keep, out, model) -> dict:
        """The parameters after an optimizer update (`keep`: whether the update applied; out:
        the step's forward output, e.g. what a running estimate follows)."""
        del old, keep, out, model
        return new

    def resample_every(self, model) -> int:
        """Steps between resamplings of the dead units (0: never)."""
        del model
        return 0

    def resample(self, params: dict, dirs, dead) -> dict:
        """The parameters with the `dead` units started again along `dirs` (n, d)."""
        raise NotImplementedError("this recipe does not resample dead units")


class VectorRecipe(Recipe):
    """The SAE recipe on vectors (Gao et al. 2024, and the choices README's LM section
    measured): see the module docstring."""

    def data_sample(self, rows, cfg, mesh=None):
        """{"x", "valid", "order"}: up to MEDIAN_ROWS training rows drawn with cfg.seed (in
        row order), as one array split over the mesh's devices (padded with invalid rows to a
        multiple of them: the same rows on every mesh); each process reads only its own share."""
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
        first rows (fitted_encoder_scale); with b_enc_init "balanced", each model's b_enc
        from its k and b_enc_mean_keep (balanced_bias) on those rows."""
        mc, x, valid = cfg.model, sample["x"], sample["valid"]
        params = self._b_dec(params, x, valid, mc)
        if mc.init_dirs != "random":
            params = self._directions(params, x, sample["order"], cfg)
        fit = min(FIT_ROWS, cfg.batch_size)  # the fits see no more rows than a step's batch
        centred = [x[:fit] - params["b_dec"][m] for m in range(cfg.n_models)]
        if mc.init_scale == "fit":
            scales = [fitted_encoder_scale(centred[m], params["W_dec"][m], k, valid[:fit])
                      for m, k in enumerate(self.init_ks(cfg))]
            params = {**params, "W_enc": params["W_dec"] * jnp.stack(scales)[:, None, None]}
        if mc.b_enc_init != "zero":
            params = {**params, "b_enc": jnp.stack([
                balanced_bias(centred[m], params["W_enc"][m], k, valid[:fit],
                              mean_keep=mc.b_enc_mean_keep)
                for m, k in enumerate(self.init_ks(cfg))])}
        return params

    def init_ks(self, cfg) -> tuple[int, ...]:
        """The k each model's fitted scale and balanced b_enc are fitted for: its top-k width."""
        return cfg.max_ks

    @staticmethod
    def _b_dec(params, x, valid, mc):
        if mc.b_dec_init == "zero":
            return params
        w = valid.astype(jnp.float32)
        center = (geometric_median(x, valid) if mc.b_dec_init == "median"
                  else (w @ x) / jnp.maximum(w.sum(), 1.0))
        return {**params, "b_dec": jnp.broadcast_to(center, params["b_dec"].shape)}

    @staticmethod
    def _directions(params, x, order, cfg):
        """Decoder rows (and the encoder's, times the fixed scale) along training rows."""
        mc = cfg.model
        x_c = x - params["b_dec"][0]
        if mc.init_dirs == "diverse":
            order = diverse_priority(x_c, order)
        rows = data_directions(x_c, order, mc.latents, jax.random.key(cfg.seed),
                               noise=mc.init_mix if mc.init_dirs == "mixed" else 0.0)
        scale = 1.0 if mc.init_scale == "fit" else mc.init_scale
        return {**params, "W_dec": jnp.broadcast_to(rows, params["W_dec"].shape),
                "W_enc": jnp.broadcast_to(rows * scale, params["W_enc"].shape)}

    def project_grads(self, params, grads, model):
        """The decoder rows' gradient without its component along the rows."""
        return {**grads, "W_dec": remove_parallel_component(params["W_dec"], grads["W_dec"])}

    def post_update(self, new, old, keep, out, model):
        """Unit decoder rows again; a frozen model's rows are left bit for bit."""
        return {**new, "W_dec": jnp.where(keep, unit_norm_rows(new["W_dec"]), old["W_dec"])}

    def resample_every(self, model) -> int:
        return model.resample_every

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


# ---------------------------------------------------------------- the pieces


def unit_norm_rows(W: jax.Array, eps: float = 1e-12) -> jax.Array:
    """W with every row scaled to unit L2 norm."""
    return W / jnp.maximum(jnp.linalg.norm(W, axis=-1, keepdims=True), eps)


def remove_parallel_component(W: jax.Array, grad: jax.Array) -> jax.Array:
    """grad minus, for each row, its component along that (unit) row of W: the step then
    moves each decoder row along the sphere, to first order."""
    return grad - jnp.sum(grad * W, axis=-1, keepdims=True) * W


def update_dead_counters(since_fired: jax.Array, fired: jax.Array, n_rows) -> jax.Array:
    """Training vectors since each unit last fired: reset where it fired, else + n_rows."""
    grown = jnp.minimum(since_fired + n_rows.astype(since_fired.dtype), COUNTER_CAP)
    return jnp.where(fired, 0, grown)


def dead_mask(since_fired: jax.Array, dead_tokens: int) -> jax.Array:
    """Units that have not fired in the last dead_tokens training vectors."""
    return since_fired > dead_tokens


def resample_due(step, every: int, total_steps: int):
    """Whether the latents are resampled after this step (counted from 0): after every
    `every` steps while at most half the budget is done."""
    done = step + 1
    return (every > 0) & (done % max(every, 1) == 0) & (2 * done <= total_steps)


def residual_directions(key, residual: jax.Array, w: jax.Array, rank: jax.Array) -> jax.Array:
    """(n, d) unit directions, one per latent: the residuals of the real batch rows ordered
    by a draw with probabilities proportional to their squared norms, without replacement
    (Gumbel top-k), and the latent of `rank` r taking the r-th (cycling past the batch)."""
    sq = jnp.sum(jnp.square(residual), axis=-1) * w
    scores = jnp.where(sq > 0, jnp.log(jnp.where(sq > 0, sq, 1.0)), -jnp.inf)
    order = jnp.argsort(-(scores + jax.random.gumbel(key, sq.shape)))
    return unit_norm_rows(residual[order[jnp.maximum(rank, 0) % residual.shape[0]]])


@jax.jit
def geometric_median(points: jax.Array, valid: jax.Array | None = None, max_iter: int = 100,
                     tol: float = 1e-5) -> jax.Array:
    """The point minimising the sum of Euclidean distances to the `valid` rows of `points`
    (N, d) (all without a mask), by Weiszfeld's iteration from their mean (a point that
    lands on a sample is kept away by a tiny floor)."""
    points = points.astype(jnp.float32)
    real = jnp.ones(points.shape[0], jnp.float32) if valid is None else valid.astype(jnp.float32)

    def step(state):
        guess, _, i = state
        dist = jnp.maximum(jnp.linalg.norm(points - guess, axis=1), 1e-8)
        weights = real / dist
        new = (weights @ points) / weights.sum()
        return new, jnp.linalg.norm(new - guess), i + 1

    def going(state):
        _, moved, i = state
        return (moved > tol) & (i < max_iter)

    start = points.mean(axis=0) if valid is None else (real @ points) / real.sum()
    median, _, _ = lax.while_loop(going, step, (start, jnp.asarray(jnp.inf, jnp.float32), 0))
    return median


@functools.partial(jax.jit, static_argnames=("k", "chunk"))
def fitted_encoder_scale(x_c: jax.Array, W_dec: jax.Array, k: int,
                         valid: jax.Array | None = None, chunk: int = 64) -> jax.Array:
    """The s for which W_enc = s W_dec reconstructs the centred rows x_c best at init: with
    z = ReLU(TopK(x_c W_dec^T)) and r = z W_dec, the reconstruction is s r, and
    s = <x_c, r> / <r, r> minimises |x_c - s r|^2 summed over the (valid) rows. For k
    latents of random directions r grows about as sqrt(k), so the best s falls with k.
    Taken over `chunk` rows at a time: its (chunk, n) pre-activations are all it holds."""
    valid = jnp.ones(x_c.shape[0], bool) if valid is None else valid
    pad = (-x_c.shape[0]) % chunk
    x = jnp.pad(x_c, ((0, pad), (0, 0))).reshape(-1, chunk, x_c.shape[1])
    w = jnp.pad(valid, (0, pad)).reshape(-1, chunk).astype(x_c.dtype)

    def sums(part):
        xc, wc = part
        vals, idx = jax.lax.top_k(xc @ W_dec.T, k)
        r = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), W_dec[idx])
        return jnp.sum(wc[:, None] * xc * r), jnp.sum(wc[:, None] * r * r)

    num, den = jax.lax.map(sums, (x, w))
    return jnp.sum(num) / jnp.maximum(jnp.sum(den), 1e-30)


def balanced_bias(x_c: jax.Array, W_enc: jax.Array, k: int, valid: jax.Array | None = None,
                  chunk: int = 64, mean_keep: float = 1.0) -> jax.Array:
    """(n,) b_enc that puts each latent's threshold at its own (1 - k/n) quantile over the
    centred rows x_c: every latent starts positive on r = ceil(rows k / n) of the (valid)
    rows, at least one, so that none starts out never chosen; less (1 - mean_keep) times the
    thresholds' mean (the same latents chosen, their values less shrunk). The rows are taken `chunk` at
    a time, each latent keeping its r + 1 largest pre-activations so far: it holds (n,
    chunk + r + 1) numbers, all of them along the latents (split as W_enc is split)."""
    n, rows = W_enc.shape[0], x_c.shape[0]
    if rows < 2:
        return jnp.zeros(n, W_enc.dtype)
    valid = jnp.ones(rows, bool) if valid is None else valid
    r = min(max(1, -(-rows * k // n)), rows - 1)
    pad = (-rows) % chunk
    xs = jnp.pad(x_c, ((0, pad), (0, 0))).reshape(-1, chunk, x_c.shape[1])
    vs = jnp.pad(valid, (0, pad)).reshape(-1, chunk)

    def merge(top, part):
        xc, vc = part
        pre = jnp.where(vc[None, :], W_enc @ xc.T, -jnp.inf)  # (n, chunk)
        return jax.lax.top_k(jnp.concatenate([top, pre], axis=1), r + 1)[0], None

    top, _ = jax.lax.scan(merge, jnp.full((n, r + 1), -jnp.inf, W_enc.dtype), (xs, vs))
    t = 0.5 * (top[:, -2] + top[:, -1])  # halfway between the r-th largest and the next
    t = jnp.where(jnp.isfinite(t), t, 0.0)
    return -(t - (1 - mean_keep) * t.mean())


DIVERSE_COS = 0.9  # init_dirs "diverse": rows this close to a row of higher priority wait
DIVERSE_BLOCK = 2048


def diverse_priority(x_c: jax.Array, order: jax.Array, cos: float = DIVERSE_COS) -> jax.Array:
    """`order` with every row whose direction lies within `cos` of a real row of higher
    priority (lower order) moved behind all the others (their order kept among them): rows
    taken in the new order are pairwise less similar than `cos` while there are enough."""
    unit = unit_norm_rows(x_c)
    real = jnp.isfinite(order)
    crowded = []
    for start in range(0, x_c.shape[0], DIVERSE_BLOCK):
        block = slice(start, start + DIVERSE_BLOCK)
        sim = unit[block] @ unit.T
        before = (order[None, :] < order[block, None]) & real[None, :]
        crowded.append(jnp.any((sim > cos) & before, axis=1))
    crowded = jnp.concatenate(crowded)
    return jnp.where(crowded & real, order + 2.0, order)  # orders lie in [0, 1)


def data_directions(x_c: jax.Array, order: jax.Array, n: int, key: jax.Array,
                    noise: float = 0.0) -> jax.Array:
    """(n, d) unit rows along the centred rows x_c taken in `order` (a random priority per
    row, inf for padding: the same rows whatever the padding), each drawn once while there
    are enough; past them the rows repeat, mixed with 0.3 of a random direction so that no
    two are equal. With noise, every row is mixed with that much of a random direction."""
    count = jnp.sum(jnp.isfinite(order))
    idx = jnp.argsort(order)[jnp.arange(n) % count]
    rows = unit_norm_rows(x_c[idx])
    g = unit_norm_rows(jax.random.normal(key, rows.shape))
    mix = jnp.where(jnp.arange(n) >= count, max(noise, 0.3), noise)[:, None]
    return unit_norm_rows(rows + mix * g)
