"""Convolutions with PyTorch semantics against direct NumPy definitions; the original's shapes."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import native_ops
from ksae_jax.models import conv

NATIVE = native_ops.unavailable() is None  # the patch gather serves one CPU device only
PATHS = dict(argnames="native", argvalues=[False, True][:1 + NATIVE],
             ids=["xla", "native"][:1 + NATIVE])


def numpy_conv2d(x, w, b, s, p):
    """torch Conv2d by its definition; x NHWC, w (out, in, k, k)."""
    n, h, wd, c = x.shape
    o, _, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    y = np.zeros((n, ho, wo, o)) + b
    for oy in range(ho):
        for ox in range(wo):
            patch = xp[:, oy * s:oy * s + k, ox * s:ox * s + k, :]  # (n, k, k, c)
            y[:, oy, ox] += np.einsum("nijc,ocij->no", patch, w)
    return y


def numpy_conv_transpose2d(x, w, b, s, p, op):
    """torch ConvTranspose2d by its definition: every input pixel scatters w (in, out, k, k)."""
    n, h, wd, c = x.shape
    _, o, k, _ = w.shape
    ho, wo = (h - 1) * s - 2 * p + k + op, (wd - 1) * s - 2 * p + k + op
    full = np.zeros((n, (h - 1) * s + k + op, (wd - 1) * s + k + op, o))
    for iy in range(h):
        for ix in range(wd):
            full[:, iy * s:iy * s + k, ix * s:ix * s + k] += np.einsum("nc,coij->nijo", x[:, iy, ix], w)
    return full[:, p:p + ho, p:p + wo] + b


# (in size, c_in, c_out, k, stride, padding, output_padding) of every conv layer of the original
ENCODER = [(28, 1, 16, 3, 2, 1), (14, 16, 32, 3, 2, 1), (7, 32, 64, 5, 2, 1)]
DECODER = [(3, 64, 32, 5, 2, 1, 0), (7, 32, 16, 3, 2, 1, 1), (14, 16, 1, 3, 2, 1, 1)]


def _random(shape, seed):  # NumPy's draws: a jax.random draw compiles a program per shape
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("size,c_in,c_out,k,s,p", ENCODER + [(9, 3, 4, 4, 3, 2)])
def test_conv2d_matches_definition(size, c_in, c_out, k, s, p):
    x, w, b = _random((2, size, size, c_in), 0), _random((c_out, c_in, k, k), 1), _random((c_out,), 2)
    got = conv.conv2d_ref(jnp.float32(x), jnp.float32(w), jnp.float32(b), s, p)
    want = numpy_conv2d(x, w, b, s, p)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("size,c_in,c_out,k,s,p,op", DECODER + [(4, 3, 2, 4, 3, 2, 1)])
def test_conv_transpose2d_matches_definition(size, c_in, c_out, k, s, p, op):
    x, w, b = _random((2, size, size, c_in), 0), _random((c_in, c_out, k, k), 1), _random((c_out,), 2)
    got = conv.conv_transpose2d_ref(jnp.float32(x), jnp.float32(w), jnp.float32(b), s, p, op)
    want = numpy_conv_transpose2d(x, w, b, s, p, op)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_conv_transpose_is_the_adjoint_of_conv():
    """<conv(u), v> == <u, conv_transpose(v)> with the same weight (PyTorch's definition)."""
    for size, c_in, c_out, k, s, p, op in DECODER:
        w = jnp.float32(_random((c_in, c_out, k, k), 3))
        v = jnp.float32(_random((2, size, size, c_in), 4))
        out = conv.conv_transpose2d_ref(v, w, jnp.zeros(c_out), s, p, op)
        u = jnp.float32(_random(out.shape, 5))
        lhs = jnp.vdot(conv.conv2d_ref(u, w, jnp.zeros(c_in), s, p), v)
        rhs = jnp.vdot(u, out)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4)


def test_output_sizes_match_the_original():
    sizes = [conv.conv_out_size(n, k, s, p) for n, _, _, k, s, p in ENCODER]
    assert sizes == [14, 7, 3]
    sizes = [conv.conv_transpose_out_size(n, k, s, p, op) for n, _, _, k, s, p, op in DECODER]
    assert sizes == [7, 14, 28]


def _rel_close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


CONV_CASES = ENCODER + [(9, 3, 4, 4, 3, 2), (12, 2, 3, 3, 1, 1), (5, 3, 2, 3, 2, 0)]
CONVT_CASES = DECODER + [(4, 3, 2, 4, 3, 2, 1), (6, 2, 3, 3, 1, 1, 0), (10, 3, 2, 5, 2, 2, 1)]


@pytest.mark.parametrize(**PATHS)
@pytest.mark.parametrize("size,c_in,c_out,k,s,p", CONV_CASES)
def test_fast_conv2d_equals_reference_forward_and_gradient(size, c_in, c_out, k, s, p, native):
    x, w, b = (jnp.float32(_random(shape, i)) for i, shape in
               enumerate([(3, size, size, c_in), (c_out, c_in, k, k), (c_out,)]))
    fast = functools.partial(conv.conv2d, native=native)
    _rel_close(fast(x, w, b, s, p), conv.conv2d_ref(x, w, b, s, p))
    ct = jnp.float32(_random(conv.conv2d_ref(x, w, b, s, p).shape, 9))
    grads = [jax.grad(lambda *a: jnp.vdot(f(*a, s, p), ct), argnums=(0, 1, 2))(x, w, b)
             for f in (fast, conv.conv2d_ref)]
    for g_fast, g_ref in zip(*grads):
        _rel_close(g_fast, g_ref)


@pytest.mark.parametrize(**PATHS)
@pytest.mark.parametrize("size,c_in,c_out,k,s,p,op", CONVT_CASES)
def test_fast_conv_transpose2d_equals_reference_forward_and_gradient(size, c_in, c_out, k, s, p, op,
                                                                      native):
    x, w, b = (jnp.float32(_random(shape, i)) for i, shape in
               enumerate([(3, size, size, c_in), (c_in, c_out, k, k), (c_out,)]))
    fast = functools.partial(conv.conv_transpose2d, native=native)
    _rel_close(fast(x, w, b, s, p, op), conv.conv_transpose2d_ref(x, w, b, s, p, op))
    ct = jnp.float32(_random(conv.conv_transpose2d_ref(x, w, b, s, p, op).shape, 9))
    grads = [jax.grad(lambda *a: jnp.vdot(f(*a, s, p, op), ct), argnums=(0, 1, 2))(x, w, b)
             for f in (fast, conv.conv_transpose2d_ref)]
    for g_fast, g_ref in zip(*grads):
        _rel_close(g_fast, g_ref)


def test_every_fast_path_is_exercised():
    assert conv._is_tiny(jnp.zeros((1, 7, 7, 1)), 3) and conv._is_tiny(jnp.zeros((1, 3, 3, 1)), 7)
    assert not conv._is_tiny(jnp.zeros((1, 14, 14, 1)), 7)
    x, w = jnp.zeros((2, 7, 7, 3)), jnp.zeros((4, 3, 3, 3))
    assert conv._native(x, w, True) == NATIVE and not conv._native(x, w, False)
    assert not conv._native(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), True)
    lowered = jax.jit(lambda x, w: conv.conv2d(x, w, jnp.zeros(4), 2, 1)).lower(x, w).as_text()
    assert ("ksae_pixel_gather" in lowered) == NATIVE
    if jax.default_backend() == "cpu" and jax.device_count() == 1:
        assert NATIVE  # g++ is here: a miss is a broken build


@pytest.mark.parametrize("size,k,s,p", [(14, 3, 2, 1), (7, 5, 2, 1), (5, 3, 2, 0), (9, 4, 3, 2)])
def test_patch_tables_are_each_others_inverse(size, k, s, p):
    """Every patch entry that reads a pixel is listed, once, in that pixel's reader row."""
    reads = conv._window_table(size, k, s, p)[:, 0]
    readers = conv._reader_table(size, k, s, p)
    pairs = {(int(q), e) for e, q in enumerate(reads) if q >= 0}
    listed = [(q, int(e)) for q in range(size * size) for e in readers[q] if e >= 0]
    assert len(listed) == len(set(listed)) and set(listed) == pairs


@pytest.mark.skipif(not NATIVE, reason="the native kernels serve one CPU device only")
def test_pixel_gather_sums_the_listed_rows():
    src = jnp.float32(_random((3, 5, 4), 0))
    table = np.array([[0, -1], [4, 2], [-1, -1], [5, 1]], np.int32)  # 5 is out of range: skipped
    want = [[src[b, 0], src[b, 4] + src[b, 2], 0 * src[b, 0], src[b, 1]] for b in range(3)]
    np.testing.assert_allclose(native_ops.pixel_gather(src, table), np.array(want), rtol=1e-6)
