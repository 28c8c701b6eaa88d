"""TopK SAEs on vectors: the recipe's pieces against references, training, sweeps, synthetic data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import losses, models, recipe, sae_config, step, train
from ksae_jax.data import synthetic
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.recipe import MEDIAN_ROWS


@pytest.fixture(scope="module")
def syn():
    return synthetic.generate(6000, d=32, n_features=48, mean_active=3, seed=1)


def test_fvu_and_total_variance_match_numpy():
    rng = np.random.default_rng(0)
    x, r = rng.standard_normal((20, 7)), rng.standard_normal((20, 7))
    w = np.ones(20)
    w[15:] = 0  # padding rows do not count
    denom = losses.total_variance(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    got = losses.fvu(jnp.asarray(r, jnp.float32), jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), denom)
    xr, rr = x[:15], r[:15]
    np.testing.assert_allclose(got, ((rr - xr) ** 2).sum() / ((xr - xr.mean(0)) ** 2).sum(), rtol=1e-5)


def test_decoder_projection_and_renormalisation():
    rng = np.random.default_rng(1)
    W = recipe.unit_norm_rows(jnp.asarray(rng.standard_normal((10, 6)), jnp.float32))
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1, rtol=1e-6)
    g = recipe.remove_parallel_component(W, jnp.asarray(rng.standard_normal((10, 6)), jnp.float32))
    np.testing.assert_allclose(np.sum(np.asarray(g) * np.asarray(W), axis=1), 0, atol=1e-6)


def test_dead_counters_advance_and_reset():
    since = jnp.array([0, 5, 100, 7])
    fired = jnp.array([False, True, False, False])
    np.testing.assert_array_equal(recipe.update_dead_counters(since, fired, jnp.float32(10)), [10, 0, 110, 17])
    np.testing.assert_array_equal(recipe.dead_mask(jnp.array([10, 0, 110, 17]), 16), [False, False, True, True])
    big = recipe.update_dead_counters(jnp.array([recipe.COUNTER_CAP]), jnp.array([False]), jnp.float32(4096))
    assert int(big[0]) == recipe.COUNTER_CAP  # saturates, never wraps


def test_geometric_median_against_brute_force():
    rng = np.random.default_rng(2)
    pts = np.concatenate([rng.standard_normal((40, 2)), rng.standard_normal((5, 2)) * 50 + 200])
    got = np.asarray(recipe.geometric_median(jnp.asarray(pts, jnp.float32)))
    grid = np.stack(np.meshgrid(np.linspace(-2, 2, 401), np.linspace(-2, 2, 401)), -1).reshape(-1, 2)
    cost = np.linalg.norm(pts[None] - grid[:, None], axis=-1).sum(1)
    best = grid[cost.argmin()]
    assert np.linalg.norm(got - best) < 0.02
    assert np.linalg.norm(pts - got, axis=1).sum() <= cost.min() + 1e-3
    assert np.linalg.norm(got - pts.mean(0)) > 10  # far from the mean: the outliers barely move it


def _auxk_numpy(pre, dead, x, recon, W_dec, aux_k):
    masked = np.where(dead[None], pre, -np.inf)
    idx = np.argsort(-masked, axis=1, kind="stable")[:, :aux_k]
    vals = np.maximum(np.take_along_axis(masked, idx, 1), 0)
    vals = np.where(dead[idx], vals, 0)
    e_hat = np.einsum("bk,bkd->bd", vals, W_dec[idx])
    e = x - recon
    scale = min(dead.sum() / aux_k, 1.0)
    return scale * ((e_hat - e) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


@pytest.mark.parametrize("decoder", ["sparse", "native", "dense"])
def test_auxk_matches_numpy_and_is_zero_without_dead_latents(decoder):
    cfg = sae_config(12, (3,), latents=40, aux_k=6, decoder=decoder,
                     dead_tokens=10)
    family = models.family(cfg.model)
    params = family.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 12))
    batch = {"x": x, "w": jnp.ones(16)}
    dead = jnp.zeros(40, bool).at[jnp.array([1, 5, 6, 20, 33])].set(True)
    loss_fn = jax.jit(lambda d: step.loss_fn(params, batch, {"k": 3}, d, cfg=cfg, max_k=3))
    with_dead, (m, _) = loss_fn(dead)
    without, (m0, _) = loss_fn(jnp.zeros(40, bool))
    np.testing.assert_allclose(without, m0["rec"], rtol=1e-6)  # AuxK adds exactly 0
    out = family.forward(params, x, jnp.ones(16), {"k": 3}, 3, terms=False)
    p = jax.tree.map(np.asarray, params)
    pre = (np.asarray(x) - p["b_dec"]) @ p["W_enc"].T + p["b_enc"]
    want = _auxk_numpy(pre, np.asarray(dead), np.asarray(x), np.asarray(out.recon), p["W_dec"], 6)
    np.testing.assert_allclose(with_dead - m["rec"], cfg.model.aux_coef * want, rtol=1e-4)
    assert want > 0


def test_training_keeps_decoder_rows_unit_norm_and_reduces_fvu(syn):
    cfg = sae_config(32, (3, 6), latents=96, steps=60, batch_size=256, eval_every=30)
    r = train.train_sweep(cfg, syn.x[:5000], syn.x[5000:], progress=False)
    np.testing.assert_allclose(np.linalg.norm(r.params["W_dec"], axis=-1), 1, rtol=1e-5)
    family = models.family(cfg.model)
    rows = family.rows(syn.x[:5000], "train")
    untrained = evaluate(cfg, step.init_state(cfg, rows).params,
                         EvalSet(family.rows(syn.x[5000:], "test"))).fvu
    assert (np.array([f[-1] for f in r.history["eval_fvu"]]) < 0.7 * untrained).all()
    assert r.history["eval_fvu"][1][-1] < r.history["eval_fvu"][0][-1]  # larger k, lower FVU
    assert r.final.l0.tolist() == pytest.approx([3, 6], abs=0.2)
    sample = syn.x[:5000][np.sort(np.random.default_rng(0).permutation(5000)[:MEDIAN_ROWS])]
    init = step.init_state(cfg, rows)  # b_dec: the sample's mean by default
    np.testing.assert_allclose(init.params["b_dec"][1], sample.mean(0), rtol=1e-5, atol=1e-6)
    median_cfg = sae_config(32, (3, 6), latents=96, steps=60, batch_size=256, b_dec_init="median")
    median = recipe.geometric_median(jnp.asarray(sample))
    np.testing.assert_allclose(step.init_state(median_cfg, rows).params["b_dec"][1], median,
                               rtol=1e-5, atol=1e-6)
    assert np.abs(median - sample.mean(0)).max() > 1e-3  # the two starts differ here


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_sae_sweep_equals_each_k_alone(syn, batching):
    base = dict(latents=64, steps=12, batch_size=200, dead_tokens=400, batching=batching,
                multi_topk=True)
    sweep = train.train_sweep(sae_config(32, (2, 5), **base), syn.x[:4000], syn.x[4000:],
                              progress=False)
    for i, k in enumerate((2, 5)):
        alone = train.train_sweep(sae_config(32, (k,), **base), syn.x[:4000], syn.x[4000:],
                                  progress=False)
        for a, b in zip(jax.tree.leaves(sweep.params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(a[i], b[0], rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(sweep.since_fired[i], alone.since_fired[0])


@pytest.mark.parametrize("dec", ["sparse", "native"])
def test_sparse_and_dense_training_agree(syn, dec):
    runs = [train.train_sweep(sae_config(32, (4,), latents=64, steps=10, batch_size=200,
                                         decoder=d, dead_tokens=300),
                              syn.x[:4000], syn.x[4000:], progress=False) for d in (dec, "dense")]
    np.testing.assert_allclose(runs[0].history["eval_fvu"], runs[1].history["eval_fvu"], rtol=1e-3)
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_synthetic_generator_statistics():
    s = synthetic.generate(40_000, d=64, n_features=128, mean_active=5, seed=0)
    assert s.x.shape == (40_000, 64) and s.features.shape == (128, 64)
    np.testing.assert_allclose(np.linalg.norm(s.features, axis=1), 1, rtol=1e-5)
    assert s.probs.sum() == pytest.approx(5) and s.probs[0] / s.probs[1] == pytest.approx(1 / 0.99)
    corr = synthetic.generate(40_000, d=64, n_features=128, mean_active=5, seed=0, correlation=0.5)
    assert corr.x.shape == s.x.shape
    mmcs, rec, best = synthetic.recovery(np.concatenate([s.features, -s.features]), s.features)
    assert mmcs == pytest.approx(1) and rec == 1 and best.shape == (128,)
    with pytest.raises(ValueError, match="probability above 1"):
        synthetic.firing_probs(10, 20, 0.99)


def test_synthetic_mean_number_of_active_features():
    rng_counts = []
    p = synthetic.firing_probs(512, 5.0, 0.99)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rng_counts.append((rng.random((1000, 512)) < p).sum(axis=1).mean())
    assert np.mean(rng_counts) == pytest.approx(5, rel=0.02)
    s = synthetic.generate(2000, d=512, n_features=512, mean_active=5, seed=3)
    # with G = d the features are linearly independent: solve for the coefficients exactly
    coef = np.linalg.solve(s.features.T.astype(np.float64), s.x.T.astype(np.float64)).T
    assert (np.abs(coef) > 1e-4).sum(axis=1).mean() == pytest.approx(5, rel=0.1)
    assert coef.min() > -1e-4 and coef.max() < 1 + 1e-4


def test_fitted_encoder_scale_minimises_the_init_error_chunk_by_chunk():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(200, 16)).astype(np.float32))
    W = recipe.unit_norm_rows(jnp.asarray(rng.normal(size=(64, 16)).astype(np.float32)))
    s = recipe.fitted_encoder_scale(x, W, 4)  # 200 rows in chunks of 64: the last one padded
    assert np.isclose(s, recipe.fitted_encoder_scale(x, W, 4, chunk=200), rtol=1e-5)
    vals, idx = jax.lax.top_k(x @ W.T, 4)
    r = jnp.einsum("bk,bkd->bd", jax.nn.relu(vals), W[idx])
    err = lambda c: float(jnp.sum((x - c * r) ** 2))
    assert err(s) < err(1.02 * s) and err(s) < err(0.98 * s)


def test_data_directions_follow_the_rows_whatever_the_padding():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 8)).astype(np.float32))
    order = jnp.asarray(rng.random(10).astype(np.float32))
    key = jax.random.key(0)
    rows = recipe.data_directions(x, order, 6, key)
    np.testing.assert_allclose(rows, recipe.unit_norm_rows(x[jnp.argsort(order)[:6]]), atol=1e-6)
    padded = recipe.data_directions(jnp.concatenate([x, jnp.zeros((6, 8))]),
                                    jnp.concatenate([order, jnp.full(6, jnp.inf)]), 6, key)
    np.testing.assert_array_equal(rows, padded)  # padding rows are never drawn
    many = recipe.data_directions(x, order, 25, key)  # more latents than rows
    np.testing.assert_allclose(jnp.linalg.norm(many, axis=1), 1.0, atol=1e-6)
    cos = np.asarray(many @ many.T)[np.triu_indices(25, 1)]
    assert cos.max() < 0.999  # no two equal


def test_diverse_priority_puts_near_copies_last(monkeypatch):
    """A row waits when a real row of higher priority lies within DIVERSE_COS of it (brute
    force); padding never pushes a row back; rows taken in the new order are pairwise apart."""
    monkeypatch.setattr(recipe, "DIVERSE_BLOCK", 16)  # several blocks
    rng = np.random.default_rng(1)
    base = rng.normal(size=(12, 8))
    x = np.concatenate([base, base[:8] + 0.05 * rng.normal(size=(8, 8)), np.zeros((4, 8))])
    order = np.concatenate([rng.random(20), np.full(4, np.inf)]).astype(np.float32)
    x[20:] = x[0]  # padding rows that copy a real one
    got = np.asarray(recipe.diverse_priority(jnp.asarray(x, jnp.float32), jnp.asarray(order)))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit @ unit.T
    for j in range(20):
        crowded = any(sim[i, j] > recipe.DIVERSE_COS and order[i] < order[j] for i in range(20))
        assert got[j] == (order[j] + 2 if crowded else order[j])
    assert np.isinf(got[20:]).all()
    first = np.argsort(got)[:int(np.sum(got < 1))]
    assert len(first) >= 12 and (sim[np.ix_(first, first)] - np.eye(len(first)) < 0.9).all()


def test_residual_directions_draw_real_rows_without_replacement():
    rng = np.random.default_rng(3)
    residual = jnp.asarray(rng.standard_normal((10, 6)), jnp.float32).at[7].set(0.0)
    w = jnp.ones(10).at[2].set(0.0)  # row 2: padding; row 7: nothing left to explain
    dirs = recipe.residual_directions(jax.random.key(0), residual, w, jnp.arange(8))
    unit = np.asarray(residual) / np.maximum(np.linalg.norm(residual, axis=1, keepdims=True), 1e-30)
    picked = [int(np.argmax(unit @ d)) for d in np.asarray(dirs)]
    np.testing.assert_allclose(np.asarray(dirs), unit[picked], atol=1e-6)
    assert sorted(picked) == [0, 1, 3, 4, 5, 6, 8, 9]  # each real row once, before any repeat
    assert recipe.resample_due(3, 4, 16) and not recipe.resample_due(4, 4, 16)
    assert not recipe.resample_due(11, 4, 16) and not recipe.resample_due(3, 0, 16)


def test_resampling_restarts_exactly_the_dead_latents(syn):
    """At a due step the latents that have not fired for resample_every steps restart along
    batch residuals (decoder unit rows, encoder at the live rows' mean norm, b_enc 0, Adam
    moments and counters 0); every other number is the step without resampling."""
    cfg = step.resolved(sae_config(32, (4,), latents=64, steps=8, batch_size=200,
                                   resample_every=2), 4000)
    plain = step.resolved(sae_config(32, (4,), latents=64, steps=8, batch_size=200), 4000)
    state = step.state_layout(step.init_state(cfg, models.family(cfg.model).rows(syn.x, "x")), "vmap")
    params, opt = jax.tree.map(lambda a: a[0], (state.params, state.opt_state))
    dead = np.zeros(64, bool)
    dead[[3, 10, 11, 40]] = True
    since = jnp.where(dead, 10 ** 6, 0).astype(jnp.int32)
    params = {**params, "b_enc": params["b_enc"].at[dead].set(-100.0)}  # they cannot fire
    batch = {"x": jnp.asarray(syn.x[:200]), "w": jnp.ones(200)}
    hp = {"k": 4, "lr": 1e-3}

    def run(c, at):
        return jax.jit(lambda *a: step.train_step(*a, cfg=c, max_k=4))(
            params, opt, since, hp, True, batch, jnp.asarray(at))
    base, due, later = run(plain, 1), run(cfg, 1), run(cfg, 2)
    frozen = jax.jit(lambda *a: step.train_step(*a, cfg=cfg, max_k=4))(
        params, opt, since, hp, False, batch, jnp.asarray(1))  # a diverged model: untouched
    for a, b in zip(jax.tree.leaves(frozen[0]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(later[:3]), jax.tree.leaves(run(plain, 2)[:3])):
        np.testing.assert_array_equal(a, b)  # not a due step: no resampling
    new, new_opt, new_since = due[:3]
    live = ~dead
    for name in ("W_enc", "b_enc", "W_dec"):
        np.testing.assert_array_equal(new[name][live], base[0][name][live])
        for got, want in ((new_opt.mu, base[1].mu), (new_opt.nu, base[1].nu)):
            assert not np.asarray(got[name][dead]).any()
            np.testing.assert_array_equal(got[name][live], want[name][live])
    np.testing.assert_array_equal(new["b_dec"], base[0]["b_dec"])
    assert not np.asarray(new_since[dead]).any()
    np.testing.assert_array_equal(new_since[live], base[2][live])
    W_dec, W_enc = np.asarray(new["W_dec"]), np.asarray(new["W_enc"])
    np.testing.assert_allclose(np.linalg.norm(W_dec[dead], axis=1), 1, rtol=1e-5)
    mean_live = np.linalg.norm(W_enc[live], axis=1).mean()
    np.testing.assert_allclose(W_enc[dead], mean_live * W_dec[dead], rtol=1e-4, atol=1e-6)
    assert not np.asarray(new["b_enc"][dead]).any()
    out = models.family(cfg.model).forward(base[0], batch["x"], batch["w"], {"k": 4}, 4,
                                           terms=False)
    residual = np.array(batch["x"] - out.recon)
    residual /= np.linalg.norm(residual, axis=1, keepdims=True)
    assert (np.max(W_dec[dead] @ residual.T, axis=1) > 1 - 1e-5).all()  # along batch residuals


@pytest.mark.parametrize("dirs", ["data", "diverse"])
def test_data_initialised_decoder_rows_lie_along_training_rows(dirs):
    """Every decoder row starts along a centred training row; "diverse" takes no two rows
    within DIVERSE_COS of each other while the sample has enough (here: 40 directions, each
    repeated with small noise, for 32 latents)."""
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(40, 16))
    x = (np.repeat(centres, 30, axis=0) + 0.02 * rng.normal(size=(1200, 16))).astype(np.float32)
    cfg = sae_config(16, (4,), latents=32, steps=1, batch_size=100, init_dirs=dirs)
    params = step.init_state(cfg, models.family(cfg.model).rows(x, "x")).params
    W = np.asarray(params["W_dec"][0])
    centred = x - np.asarray(params["b_dec"][0])
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    assert (np.max(W @ unit.T, axis=1) > 1 - 1e-5).all()
    cos = (W @ W.T)[np.triu_indices(32, 1)]
    assert (cos.max() < recipe.DIVERSE_COS) == (dirs == "diverse")


def test_balanced_b_enc_puts_every_latent_above_zero_on_its_share_of_rows():
    """recipe.balanced_bias: each latent positive on exactly ceil(rows k / n) rows, chunk by
    chunk of rows the same as at once; through the config (b_enc_init "balanced") b_enc is set so."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(500, 8)).astype(np.float32))
    W = jnp.asarray(rng.normal(size=(37, 8)).astype(np.float32))
    b = recipe.balanced_bias(x, W, 3, chunk=16)  # 500 rows in chunks of 16: the last padded
    np.testing.assert_array_equal(np.asarray((x @ W.T + b > 0).sum(0)), np.full(37, 41))
    np.testing.assert_allclose(b, recipe.balanced_bias(x, W, 3, chunk=500), rtol=1e-6)
    pre = {}
    for init, keep in (("balanced", 1.0), ("centred", 0.0)):
        cfg = sae_config(8, (2,), latents=32, steps=1, batch_size=500, b_enc_init="balanced",
                         b_enc_mean_keep=keep)
        params = step.init_state(cfg, models.family(cfg.model).rows(np.asarray(x), "x")).params
        pre[init] = np.asarray((x - params["b_dec"][0]) @ params["W_enc"][0].T
                               + params["b_enc"][0])
    np.testing.assert_array_equal((pre["balanced"] > 0).sum(0), np.full(32, 32))  # 500 * 2 / 32
    shift = pre["centred"] - pre["balanced"]  # keep 0: the thresholds less their mean
    np.testing.assert_allclose(shift, shift[0, 0], atol=1e-4)
    assert shift[0, 0] > 0
    np.testing.assert_array_equal(np.argsort(pre["centred"], 1)[:, -2:],
                                  np.argsort(pre["balanced"], 1)[:, -2:])  # the same top 2
