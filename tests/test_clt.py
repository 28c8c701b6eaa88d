"""Cross-layer transcoders: the forward (each layer's output the sum over source layers up to
it) against a loop in NumPy, the gradient against plain autodiff of that loop, and a sweep
over k that learns a map in which later outputs read earlier inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import models, train
from ksae_jax.config import Optimizer, SweepConfig
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.models.clt import CLTModel, pair_index

L, D, N, K = 3, 5, 12, 3


def _top_k_masks(P, x, k, w=None):
    """Per layer, the (B, n) mask of the k largest positive pre-activations (NumPy); with the
    row weights w, the batch's (real rows x k x L) largest over every layer (BatchTopK)."""
    pairs = x.reshape(x.shape[0], L, 2, D)
    pre = np.stack([pairs[:, l, 0] @ P["W_enc"][:, l].T + P["b_enc"][:, l] for l in range(L)], 1)
    m = np.zeros_like(pre, bool)
    if w is None:
        np.put_along_axis(m, np.argsort(-pre, axis=2, kind="stable")[:, :, :k], True, axis=2)
    else:
        flat = np.where(w[:, None, None] > 0, np.maximum(pre, 0), -1).ravel()
        m.ravel()[np.argsort(-flat, kind="stable")[:int(w.sum()) * k * L]] = True
    return list((m & (pre > 0)).transpose(1, 0, 2))


def _loop_reference(P, x, w, masks, cfg, xp=np):
    """(loss, recon (B, L, d)) by loops over target and source layers, the top-k masks given
    (in `xp`: NumPy, or jax.numpy for the gradient)."""
    pairs = x.reshape(x.shape[0], L, 2, D)
    recon, fvus = [], []
    z = [xp.where(masks[l], pairs[:, l, 0] @ P["W_enc"][:, l].T + P["b_enc"][:, l], 0.0)
         for l in range(L)]
    for m in range(L):
        out = P["b_dec"][m]
        for l in range(m + 1):
            out = out + z[l] @ P["W_dec"][:, pair_index(cfg, l, m)]
        tgt = pairs[:, m, 1]
        mean = (w @ tgt) / w.sum()
        fvus.append(xp.sum(w[:, None] * (out - tgt) ** 2) / xp.sum(w[:, None] * (tgt - mean) ** 2))
        recon.append(out)
    return sum(fvus) / L, recon


@pytest.mark.parametrize("decoder,activation", [("dense", "topk"), ("sparse", "topk"),
                                                ("sparse", "batchtopk")])
def test_forward_and_gradient_match_a_loop_over_layers(decoder, activation):
    cfg = CLTModel(d_in=D, n_layers=L, latents=N, decoder=decoder, aux_coef=0.0,
                   activation=activation)
    family = models.family(cfg)
    rng = np.random.default_rng(0)
    p = jax.tree.map(np.asarray, family.init(jax.random.key(1)))
    p = {name: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32) for name, v in p.items()}
    x = rng.normal(size=(9, 2 * L * D)).astype(np.float32)
    w = np.array([1.0] * 7 + [0.0] * 2, np.float32)
    P = {n: v.astype(np.float64) for n, v in p.items() if n != "threshold"}
    masks = _top_k_masks(P, x.astype(np.float64), K, w if activation == "batchtopk" else None)
    want_loss, want_recon = _loop_reference(P, x.astype(np.float64), w, masks, cfg)

    def loss(params):
        out = family.forward(params, x, w, {"k": jnp.int32(K)}, K)
        return family.loss_terms(out, {}).reconstruction, out

    (got, out), grads = jax.value_and_grad(loss, has_aux=True)(jax.tree.map(jnp.asarray, p))
    assert float(got) == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(np.asarray(out.recon).reshape(-1, L, D),
                               np.stack(want_recon, 1), rtol=1e-5, atol=1e-5)
    ref_grads = jax.grad(lambda q: _loop_reference(q, jnp.asarray(x), jnp.asarray(w), masks,
                                                   cfg, xp=jnp)[0])(jax.tree.map(jnp.asarray, p))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    if activation == "batchtopk":  # the rows keep different counts; served with the threshold
        assert len(set(np.count_nonzero(np.stack(masks, 1)[:7], axis=(1, 2)))) > 1
        served = family.forward({**jax.tree.map(jnp.asarray, p), "threshold": jnp.float32(0.2)},
                                x, w, {"k": jnp.int32(K)}, K, terms=False)
        pairs = x.reshape(-1, L, 2, D)
        pre = np.stack([pairs[:, l, 0] @ p["W_enc"][:, l].T + p["b_enc"][:, l]
                        for l in range(L)], 1)
        np.testing.assert_allclose(served.code, np.where(pre > 0.2, pre, 0), rtol=1e-5, atol=1e-5)


def _cross_layer_rows(rows: int, seed: int = 0):
    """Every layer's [x_l | y_l], y_m reading x_0..x_m (a cross-layer map)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(L, L, D, D)) / np.sqrt(D)
    x = rng.normal(size=(rows, L, D)) * (rng.random((rows, L, D)) < 0.4)
    y = np.stack([np.tanh(sum(x[:, l] @ A[l, m] for l in range(m + 1))) for m in range(L)], 1)
    return np.stack([x, y], axis=2).reshape(rows, -1).astype(np.float32)


def test_a_sweep_over_k_learns_a_cross_layer_map():
    rows = _cross_layer_rows(5120)
    cfg = SweepConfig(model=CLTModel(d_in=D, n_layers=L, latents=48), ks=(2, 8), steps=150,
                      batch_size=256, optim=Optimizer(lr=3e-3))
    result = train.train_sweep(cfg, rows[:4096], progress=False)
    ev = evaluate(cfg, jax.tree.map(np.asarray, result.params), EvalSet(ArrayRows(rows[4096:])))
    assert ev.fvu[1] < ev.fvu[0] < 0.5
    assert ev.extra["layer_fvu"].shape == (2, L) and (ev.extra["layer_fvu"] < 0.6).all()
    np.testing.assert_allclose(ev.extra["layer_l0"].sum(1), ev.l0, rtol=1e-6)
    assert (ev.extra["layer_l0"] <= np.array([[2], [8]])).all()
    recon = result.models().reconstruct(rows[4096:], 8).reshape(-1, L, D)
    tgt = rows[4096:].reshape(-1, L, 2, D)[:, :, 1]
    fvu = np.sum((recon - tgt) ** 2, (0, 2)) / np.sum((tgt - tgt.mean(0)) ** 2, (0, 2))
    np.testing.assert_allclose(fvu, ev.extra["layer_fvu"][1], rtol=1e-4)
