"""The TopK SAE's custom-VJP paths equal the dense autodiff references, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import sparse_ops
from ksae_jax.topk import top_k


def _problem(B, d, n, seed=0, ties=False):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (B, d))
    W_enc = jax.random.normal(ks[1], (n, d)) / np.sqrt(d)
    W_dec = jax.random.normal(ks[2], (n, d)) / np.sqrt(d)
    b_enc = jax.random.normal(ks[3], (n,)) * 0.1
    b_dec = jax.random.normal(ks[4], (d,)) * 0.1
    target = jax.random.normal(ks[5], (B, d))
    if ties:  # duplicated latents: equal pre-activations, broken by index
        W_enc = W_enc.at[1::2].set(W_enc[::2][: n // 2])
        b_enc = b_enc.at[1::2].set(b_enc[::2][: n // 2])
    return x, W_enc, b_enc, W_dec, b_dec, target


def _loss(sparse: bool, k: int):
    preacts = sparse_ops.sparse_preacts if sparse else sparse_ops.dense_preacts
    decode = sparse_ops.sparse_decode if sparse else sparse_ops.dense_decode

    def loss(W_enc, b_enc, W_dec, b_dec, x, target):
        pre = jax.lax.stop_gradient((x - b_dec) @ W_enc.T + b_enc)
        top, idx = jax.lax.top_k(pre, k)
        values = jax.nn.relu(preacts(top, x, W_enc, b_enc, b_dec, idx))
        recon = decode(values, idx, W_dec) + b_dec
        return jnp.sum((recon - target) ** 2) + jnp.sum(values ** 2) * 0.1, recon

    return loss


@pytest.mark.parametrize("B,d,n,k,ties", [(16, 12, 64, 5, False), (16, 12, 64, 8, True),
                                          (9, 7, 24, 24, False), (8, 16, 40, 1, True)])
def test_sparse_paths_equal_dense_autodiff(B, d, n, k, ties):
    x, W_enc, b_enc, W_dec, b_dec, target = _problem(B, d, n, ties=ties)
    grads = {}
    for sparse in (True, False):
        fn = jax.jit(jax.value_and_grad(_loss(sparse, k), argnums=(0, 1, 2, 3, 4), has_aux=True))
        grads[sparse] = fn(W_enc, b_enc, W_dec, b_dec, x, target)
    (v_s, r_s), g_s = grads[True]
    (v_d, r_d), g_d = grads[False]
    np.testing.assert_allclose(v_s, v_d, rtol=1e-5)
    np.testing.assert_allclose(r_s, r_d, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec", "x"), g_s, g_d):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_sparse_backward_touches_only_kept_rows():
    x, W_enc, b_enc, W_dec, b_dec, target = _problem(4, 6, 50)
    (_, _), g = jax.value_and_grad(_loss(True, 3), argnums=(0, 2), has_aux=True)(
        W_enc, b_enc, W_dec, b_dec, x, target)
    _, idx = jax.lax.top_k((x - b_dec) @ W_enc.T + b_enc, 3)
    untouched = np.setdiff1d(np.arange(50), np.asarray(idx))
    assert len(untouched) >= 50 - 12
    for grad in g:
        assert np.all(np.asarray(grad)[untouched] == 0)


@pytest.mark.parametrize("shape,k", [((6, 4096), 32), ((3, 1024), 7), ((5, 640), 20), ((4, 100), 3)])
def test_two_stage_top_k_equals_lax_top_k(shape, k):
    x = jax.random.normal(jax.random.key(1), shape)
    for z in (x, jnp.round(x * 2) / 2, jnp.zeros(shape)):  # continuous, many ties, all tied
        v, i = top_k(z, k)
        v_ref, i_ref = jax.lax.top_k(z, k)
        np.testing.assert_array_equal(v, v_ref)
        np.testing.assert_array_equal(i, i_ref)


def test_gather_and_scatter_primitives_match_numpy():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((30, 5)).astype(np.float32)
    idx = rng.integers(0, 30, (7, 16)).astype(np.int32)  # repeated indices included
    coef = rng.standard_normal((7, 16)).astype(np.float32)
    rows = rng.standard_normal((7, 5)).astype(np.float32)
    table, idx, coef, rows = map(jnp.asarray, (table, idx, coef, rows))
    np.testing.assert_allclose(sparse_ops.gather_sum(coef, idx, table),
                               np.einsum("bk,bkd->bd", coef, np.asarray(table)[np.asarray(idx)]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sparse_ops.gather_dot(rows, idx, table),
                               np.einsum("bd,bkd->bk", rows, np.asarray(table)[np.asarray(idx)]), rtol=1e-5, atol=1e-6)
    want = np.zeros((30, 5), np.float32)
    np.add.at(want, np.asarray(idx).reshape(-1),
              np.asarray(coef[:, :, None] * rows[:, None, :]).reshape(-1, 5))
    np.testing.assert_allclose(sparse_ops.scatter_rows(coef, idx, rows, 30), want, rtol=1e-5, atol=1e-6)
