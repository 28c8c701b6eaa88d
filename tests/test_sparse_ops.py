"""The TopK SAE's custom-VJP paths equal the dense autodiff references, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import native_ops, sparse_ops
from ksae_jax.topk import top_k

NATIVE = native_ops.unavailable() is None  # the C++ kernels serve one CPU device only
PATHS = ["sparse", "native"] if NATIVE else ["sparse"]


def normal(seed, shape):  # NumPy's draws: a jax.random draw compiles a program per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _problem(B, d, n, seed=0, ties=False):
    x = normal((seed, 0), (B, d))
    W_enc = normal((seed, 1), (n, d)) / np.sqrt(d)
    W_dec = normal((seed, 2), (n, d)) / np.sqrt(d)
    b_enc = normal((seed, 3), (n,)) * 0.1
    b_dec = normal((seed, 4), (d,)) * 0.1
    target = normal((seed, 5), (B, d))
    if ties:  # duplicated latents: equal pre-activations, broken by index
        W_enc = W_enc.at[1::2].set(W_enc[::2][: n // 2])
        b_enc = b_enc.at[1::2].set(b_enc[::2][: n // 2])
    return x, W_enc, b_enc, W_dec, b_dec, target


def _loss(path: str, k: int):
    """The loss by `path`: "dense" (the reference), "sparse" (XLA ops) or "native" (kernels)."""
    dense = path == "dense"
    preacts = sparse_ops.dense_preacts if dense else sparse_ops.sparse_preacts
    decode = sparse_ops.dense_decode if dense else sparse_ops.sparse_decode
    native = path == "native"

    def loss(W_enc, b_enc, W_dec, b_dec, x, target):
        pre = jax.lax.stop_gradient((x - b_dec) @ W_enc.T + b_enc)
        top, idx = jax.lax.top_k(pre, k)
        values = jax.nn.relu(preacts(top, x, W_enc, b_enc, b_dec, idx, native))
        recon = decode(values, idx, W_dec, native) + b_dec
        return jnp.sum((recon - target) ** 2) + jnp.sum(values ** 2) * 0.1, recon

    return loss


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("B,d,n,k,ties", [(16, 12, 64, 5, False), (16, 12, 64, 8, True),
                                          (9, 7, 24, 24, False), (8, 16, 40, 1, True),
                                          (70, 37, 300, 13, True)])
def test_sparse_paths_equal_dense_autodiff(path, B, d, n, k, ties):
    x, W_enc, b_enc, W_dec, b_dec, target = _problem(B, d, n, ties=ties)
    grads = {}
    for p in (path, "dense"):
        fn = jax.jit(jax.value_and_grad(_loss(p, k), argnums=(0, 1, 2, 3, 4), has_aux=True))
        grads[p] = fn(W_enc, b_enc, W_dec, b_dec, x, target)
    (v_s, r_s), g_s = grads[path]
    (v_d, r_d), g_d = grads["dense"]
    np.testing.assert_allclose(v_s, v_d, rtol=1e-5)
    np.testing.assert_allclose(r_s, r_d, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec", "x"), g_s, g_d):
        scale = np.abs(np.asarray(b)).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("path", PATHS)
def test_sparse_backward_touches_only_kept_rows(path):
    x, W_enc, b_enc, W_dec, b_dec, target = _problem(4, 6, 50)
    (_, _), g = jax.value_and_grad(_loss(path, 3), argnums=(0, 2), has_aux=True)(
        W_enc, b_enc, W_dec, b_dec, x, target)
    _, idx = jax.lax.top_k((x - b_dec) @ W_enc.T + b_enc, 3)
    untouched = np.setdiff1d(np.arange(50), np.asarray(idx))
    assert len(untouched) >= 50 - 12
    for grad in g:
        assert np.all(np.asarray(grad)[untouched] == 0)


@pytest.mark.parametrize("native", [False, True][:1 + NATIVE], ids=["xla", "native"][:1 + NATIVE])
@pytest.mark.parametrize("shape,k", [((6, 4096), 32), ((3, 1024), 7), ((5, 640), 20), ((4, 100), 3),
                                     ((3, 17), 17), ((2, 33), 1), ((1, 1), 1)])
def test_top_k_of_x_plus_bias_equals_lax_top_k(native, shape, k):
    x = normal(1, shape)
    bias = normal(2, shape[-1:]) * 0.5
    masked = jnp.where(np.random.default_rng(3).uniform(size=shape[-1:]) < 0.7, -jnp.inf, bias)
    # +-0 and +-inf; NaNs (a diverged model's) on the native kernel only: the XLA path's block
    # maxima propagate them
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1.0] + [np.nan, -np.nan] * native, np.float32)
    odd = special[np.random.default_rng(4).integers(0, len(special), shape)]
    cases = [(x, bias), (jnp.round(x * 2) / 2, jnp.round(bias)),  # continuous, many ties
             (jnp.zeros(shape), jnp.zeros(shape[-1:])),  # all tied
             (x, masked), (odd, jnp.zeros(shape[-1:]))]  # AuxK's -inf mask; the specials
    for z, b in cases:
        v, i = jax.jit(top_k, static_argnums=(1, 3))(z, k, b, native)
        v_ref, i_ref = jax.lax.top_k(z + b, k)
        np.testing.assert_array_equal(i, i_ref)
        np.testing.assert_array_equal(v, v_ref)


@pytest.mark.parametrize("ops", [sparse_ops, native_ops][:1 + NATIVE], ids=["xla", "native"][:1 + NATIVE])
@pytest.mark.parametrize("B,k,n,d", [(7, 16, 30, 5), (70, 13, 300, 37), (1, 1, 1, 1)])
def test_gather_and_scatter_primitives_match_numpy(ops, B, k, n, d):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((n, d)).astype(np.float32)
    idx = rng.integers(0, n, (B, k)).astype(np.int32)  # repeated indices included
    coef = rng.standard_normal((B, k)).astype(np.float32)
    rows = rng.standard_normal((B, d)).astype(np.float32)
    table, idx, coef, rows = map(jnp.asarray, (table, idx, coef, rows))
    picked = np.asarray(table)[np.asarray(idx)]
    np.testing.assert_allclose(ops.gather_sum(coef, idx, table),
                               np.einsum("bk,bkd->bd", coef, picked), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ops.gather_dot(rows, idx, table),
                               np.einsum("bd,bkd->bk", rows, picked), rtol=1e-5, atol=1e-5)
    want = np.zeros((n, d), np.float32)
    np.add.at(want, np.asarray(idx).reshape(-1),
              np.asarray(coef[:, :, None] * rows[:, None, :]).reshape(-1, d))
    np.testing.assert_allclose(ops.scatter_rows(coef, idx, rows, n), want, rtol=1e-5, atol=1e-5)


def test_native_kernels_serve_one_cpu_device_and_say_why_not():
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
        assert native_ops.unavailable() is None  # g++ is here: a miss is a broken build
    else:
        assert "single CPU device" in native_ops.unavailable()
    assert native_ops.serves(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    assert not native_ops.serves(jnp.zeros((2, 3), jnp.bfloat16))
    assert not native_ops.serves(jnp.zeros((0, 3)))
