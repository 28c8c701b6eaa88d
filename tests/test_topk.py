"""The k-sparse step: properties, a NumPy reference, gradients, jit and vmap."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax.topk import k_sparse, keep_top_k, top_k_mask


def numpy_keep_top_k(z, k):
    """Reference: keep the k largest per row, ties to the lower index (stable sort)."""
    z = np.asarray(z)
    out = np.zeros_like(z)
    for r in range(z.shape[0]):
        idx = np.argsort(-z[r], kind="stable")[:k]
        out[r, idx] = z[r, idx]
    return out


def normal(seed, shape):  # NumPy's draws: a jax.random draw compiles a program per shape
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.fixture
def z():
    return normal(0, (32, 64))


@pytest.mark.parametrize("k", [1, 5, 25, 64])
def test_exactly_k_nonzeros_and_matches_numpy(z, k):
    out = keep_top_k(z, k)
    assert out.shape == z.shape
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(out), axis=1), k)
    np.testing.assert_array_equal(out, numpy_keep_top_k(z, k))


def test_ties_break_to_lower_index():
    z = jnp.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = top_k_mask(z, 2, max_k=4)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    z_ties = jnp.round(normal(3, (50, 40)))  # many ties
    for k in (1, 7, 20):
        np.testing.assert_array_equal(keep_top_k(z_ties, k), numpy_keep_top_k(z_ties, k))
        np.testing.assert_array_equal(top_k_mask(z_ties, k, 20).sum(1), k)


def test_gradient_flows_only_through_kept_units(z):
    k = 10
    upstream = normal(1, z.shape)
    grad = jax.grad(lambda z: jnp.sum(k_sparse(z, k, max_k=k) * upstream))(z)
    kept = np.asarray(top_k_mask(z, k, k)).astype(bool)
    np.testing.assert_array_equal(np.asarray(grad)[~kept], 0.0)
    np.testing.assert_array_equal(np.asarray(grad)[kept], np.asarray(upstream)[kept])


def test_jit_and_no_jit_agree(z):
    eager = k_sparse(z, 7, max_k=30)
    jitted = jax.jit(k_sparse, static_argnames="max_k")(z, 7, max_k=30)
    np.testing.assert_array_equal(eager, jitted)


def test_vmapped_k_vector_equals_separate_calls(z):
    ks = jnp.array([1, 4, 16, 40])
    batched = jax.jit(jax.vmap(lambda k: k_sparse(z, k, max_k=40)))(ks)
    for i, k in enumerate(ks.tolist()):
        np.testing.assert_array_equal(batched[i], keep_top_k(z, k))


def test_leading_axes_are_rows():
    z = normal(2, (3, 5, 16))
    out = keep_top_k(z, 4)
    np.testing.assert_array_equal(out.reshape(15, 16), numpy_keep_top_k(z.reshape(15, 16), 4))


@pytest.mark.parametrize("bad", [0, -3, 65, 2.0, 2.5, "3", True, [1, 2]])
def test_bad_k_raises_value_error_naming_it(z, bad):
    named = f"k={bad}" if type(bad) is int else repr(bad)
    with pytest.raises(ValueError, match=re.escape(named)):
        keep_top_k(z, bad)


def test_traced_k_needs_max_k(z):
    with pytest.raises(ValueError, match="max_k"):
        jax.jit(lambda k: keep_top_k(z, k))(3)
    out = jax.jit(lambda k: keep_top_k(z, k, max_k=8))(3)
    np.testing.assert_array_equal(out, numpy_keep_top_k(z, 3))
