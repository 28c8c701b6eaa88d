"""The model families: one forward per family, called by training, evaluation and inference
alike; and no code outside the families (and the configs) asks which kind a model is."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import models, sae_config, train
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data import synthetic
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    vectors = synthetic.generate(600, d=16, n_features=24, mean_active=3, seed=0).x
    # one case per family: conv and mlp are both ImageFamily (the mlp compiles faster)
    yield "mlp", SweepConfig(model=ImageModel("mlp", hidden=32), ks=(3,), steps=2,
                             batch_size=30), images, ArrayRows(images, 1 / 255)
    sae = sae_config(16, (3,), latents=48, steps=2, batch_size=100, multi_topk=True)
    yield "topk", sae, vectors, models.family(sae.model).rows(vectors, "x")


@pytest.mark.parametrize("name,cfg,x,rows", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_training_evaluation_and_inference_call_the_one_forward(name, cfg, x, rows, monkeypatch):
    family = models.family(cfg.model)

    def outcomes():
        r = train.train_sweep(cfg, x, progress=False)
        ev = evaluate(cfg, jax.tree.map(np.asarray, r.params), EvalSet(rows))
        recon = r.models().reconstruct(x[:5], cfg.ks[0])
        return r.params, ev.mse, recon

    before = outcomes()
    real = type(family).forward

    def changed(self, params, x, *args, **kw):  # the family's forward, on shifted inputs
        return real(self, params, x + 0.25, *args, **kw)

    monkeypatch.setattr(type(family), "forward", changed)
    jax.clear_caches()  # the jitted steps traced the old forward
    try:
        after = outcomes()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    trained_differently = any(not np.array_equal(a, b) for a, b in
                              zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
    assert trained_differently, f"{name}: training did not call the family's forward"
    assert not np.allclose(before[1], after[1]), f"{name}: evaluation did not call it"
    assert not np.allclose(before[2], after[2]), f"{name}: inference did not call it"


def test_no_code_outside_the_families_asks_which_kind_a_model_is():
    pattern = re.compile(r"is_image|arch ==|arch in |arch != ")
    hits = []
    for folder in ("ksae_jax", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("ksae_jax/models/") or rel == "ksae_jax/config.py":
                continue
            hits += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if pattern.search(line)]
    assert hits == []


# ---------------------------------------------------------------- the SAE families vs NumPy

def _setup(arch, **fields):
    from ksae_jax.config import SAE_MODELS
    rng = np.random.default_rng(3)
    d, n, b = 6, 10, 8
    mc = SAE_MODELS[arch](d, n, **fields)
    family = models.family(mc)
    p = jax.tree.map(np.asarray, family.init(jax.random.key(1)))
    p = {**p, "b_enc": rng.standard_normal(n).astype(np.float32) * 0.3,
         "b_dec": rng.standard_normal(d).astype(np.float32) * 0.2}
    x = (rng.standard_normal((b, d)) * 2).astype(np.float32)
    w = np.ones(b, np.float32)
    w[-2:] = 0  # two padding rows
    return family, p, x, w


def _np_dense_grads(p, x, w, keep, widths, code_grad_extra=None):
    """FVU summed over the reconstructions from the first m latents (m in widths), and its
    gradient in float64, for dense codes ReLU(pre) on the kept entries (a constant mask)."""
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x, w = x.astype(np.float64), w.astype(np.float64)
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    code = np.where(keep, np.maximum(pre, 0), 0)
    real = x[w > 0]
    denom = ((real - real.mean(0)) ** 2).sum()
    loss, g = 0.0, {k: np.zeros_like(v) for k, v in P.items()}
    g_code = np.zeros_like(code)
    for m in widths:
        r = code[:, :m] @ P["W_dec"][:m] + P["b_dec"] - x
        loss += (w[:, None] * r ** 2).sum() / denom
        gr = 2 * w[:, None] * r / denom
        g["W_dec"][:m] += code[:, :m].T @ gr
        g["b_dec"] += gr.sum(0)
        g_code[:, :m] += gr @ P["W_dec"][:m].T
    g_pre = g_code * (keep & (pre > 0))
    g["W_enc"] = g_pre.T @ (x - P["b_dec"])
    g["b_enc"] = g_pre.sum(0)
    g["b_dec"] -= g_pre.sum(0) @ P["W_enc"]
    return loss, g, code, pre


def _jax_loss_and_grads(family, p, x, w, hp):
    cfg = SweepConfig(model=family.model, ks=(hp["k"],) if "l0_coef" not in hp else (),
                      l0_coefs=(hp["l0_coef"],) if "l0_coef" in hp else (), steps=1)
    fn = lambda q: family.loss(q, {"x": x, "w": w}, hp, None, cfg=cfg, max_k=1)
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jax.tree.map(np.asarray, p))
    return float(loss), jax.tree.map(np.asarray, g), m


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batch_topk_families_match_numpy_forward_and_gradient(arch):
    family, p, x, w = _setup(arch, **({"prefixes": (3, 6)} if arch == "matryoshka" else {}))
    k = 3
    P = {n: np.asarray(v, np.float64) for n, v in p.items()}
    acts = np.maximum((x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"], 0)
    flat = np.where(w[:, None] > 0, acts, -1).ravel()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:int(w.sum()) * k]] = True  # the batch's top 6 x 3
    keep = keep.reshape(acts.shape) & (acts > 0)
    widths = family.model.widths if arch == "matryoshka" else (family.model.hidden,)
    want_loss, want_grad, want_code, _ = _np_dense_grads(p, x, w, keep, widths)
    out = family.forward(jax.tree.map(np.asarray, p), x, w, k, 1)
    np.testing.assert_allclose(out.code, want_code, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(np.asarray(out.code)[w > 0]) == keep.sum() and \
        np.count_nonzero(np.asarray(out.code).sum(1) > 0) > 1  # rows keep different counts
    loss, grads, m = _jax_loss_and_grads(family, p, x, w, {"k": k})
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grads[name], want_grad[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert float(m["min_kept"]) == pytest.approx(acts[keep].min(), rel=1e-6)
    # served as a JumpReLU with the one trained threshold
    served = family.forward({**jax.tree.map(np.asarray, p), "threshold": np.float32(0.5)}, x, w,
                            k, 1, terms=False)
    np.testing.assert_allclose(served.code, np.where(acts > 0.5, acts, 0), rtol=1e-5, atol=1e-6)


def test_kth_largest_is_exact():
    from ksae_jax.models.batchtopk import kth_largest
    v = np.random.default_rng(0).random((50, 40)).astype(np.float32)
    v[3, :5] = 0.0
    for count in (1, 7, 300, 2000):
        assert float(kth_largest(jnp.asarray(v), count)) == np.sort(v.ravel())[::-1][count - 1]


def test_jumprelu_matches_numpy_forward_and_straight_through_gradient():
    family, p, x, w = _setup("jumprelu", bandwidth=0.5)
    n, lam, eps = family.model.hidden, 0.05, 0.5
    P = {k: np.asarray(v, np.float64) for k, v in p.items()}
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    theta = np.maximum(np.quantile(pre, 0.6, axis=0), 0.05)  # inside the data: the kernel sees entries
    p = {**p, "log_threshold": np.log(theta).astype(np.float32)}
    P["log_threshold"] = np.log(theta)
    keep = pre > theta
    fvu, g, code, _ = _np_dense_grads({k: v for k, v in p.items() if k != "log_threshold"},
                                      x, w, keep, (n,))
    kernel = (np.abs((pre - theta) / eps) < 0.5).astype(np.float64)
    real = w / w.sum()
    g_code = _np_code_grad(P, x, w, code)
    g_theta = (g_code * -(theta / eps) * kernel).sum(0) + lam * (real[:, None] * -kernel / eps).sum(0)
    l0 = (real[:, None] * keep).sum()
    loss, grads, _ = _jax_loss_and_grads(family, p, x, w, {"k": 1, "l0_coef": lam})
    out = family.forward(jax.tree.map(np.asarray, p), x, w, 1, 1, terms=False)
    np.testing.assert_allclose(out.code, np.where(keep, pre, 0), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(fvu + lam * l0, rel=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grads[name], g[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(grads["log_threshold"], g_theta * theta, rtol=1e-4, atol=1e-6)
    assert np.abs(g_theta).sum() > 0  # the pseudo-gradient is there


def _np_code_grad(P, x, w, code):
    x, w = x.astype(np.float64), w.astype(np.float64)
    real = x[w > 0]
    denom = ((real - real.mean(0)) ** 2).sum()
    r = code @ P["W_dec"] + P["b_dec"] - x
    return (2 * w[:, None] * r / denom) @ P["W_dec"].T


@pytest.mark.parametrize("model", [ImageModel("conv", hidden=16), ImageModel("mlp", hidden=32),
                                   sae_config(16, (3,), latents=48).model],
                         ids=lambda m: m.arch)
def test_bfloat16_forward_is_float32_within_bf16_rounding(model):
    import dataclasses
    rng = np.random.default_rng(0)
    x = (jnp.asarray(rng.random((8, 28, 28), np.float32)) if model.arch in ("conv", "mlp")
         else jnp.asarray(rng.normal(size=(8, 16)).astype(np.float32)))
    w = jnp.ones(8)
    f32, bf16 = models.family(model), models.family(dataclasses.replace(model, dtype="bfloat16"))
    params = f32.init(jax.random.key(0))
    a = f32.forward(params, x, w, 3, 3, terms=False).recon
    b = bf16.forward(params, x, w, 3, 3, terms=False).recon
    assert b.dtype == jnp.float32 and not np.array_equal(a, b)  # bf16 did run
    assert float(jnp.max(jnp.abs(a - b))) < 0.03 * float(jnp.max(jnp.abs(a))) + 1e-3
