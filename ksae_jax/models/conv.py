"""2-D convolutions with PyTorch's semantics and parameter layouts, on NHWC activations.

`conv2d_ref` / `conv_transpose2d_ref` are the plain lax definitions. `conv2d` /
`conv_transpose2d` compute the same functions faster on XLA:CPU, which is slow at
input-dilated (lhs_dilation) convolutions: those appear in the forward pass of a
transposed convolution and in the input gradient of a strided one. Here

- a transposed convolution runs as a sub-pixel (depth-to-space) decomposition: one
  stride-1 convolution whose s*s output groups are the s*s output phases;
- the input gradient of a convolution is the transposed convolution of the output
  gradient (sub-pixel again), and vice versa, through a custom VJP;
- layers whose input and output grids are both tiny (the 7x7 <-> 3x3 ones) multiply by
  the dense matrix of the convolution, built from the kernel, instead.

Each is tested against the lax reference, forward and gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN_CONV = ("NHWC", "OIHW", "NHWC")  # torch Conv2d weight: (out, in, kh, kw)
_DN_CONVT = ("NHWC", "IOHW", "NHWC")  # torch ConvTranspose2d weight: (in, out, kh, kw)

# Grids with (input pixels) x (output pixels) at most this use the dense matrix: on 2
# CPU cores it beat the convolution for 7x7 <-> 3x3 (441 pairs) and lost for 14x14 <-> 7x7.
DENSE_MAX_PIXEL_PAIRS = 1024


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_out_size(size: int, kernel: int, stride: int, padding: int,
                            output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + kernel + output_padding


# ---------------------------------------------------------------- references

def conv2d_ref(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int) -> jax.Array:
    """torch.nn.functional.conv2d: x (N, H, W, Cin), w (Cout, Cin, k, k), b (Cout,)."""
    y = lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                 dimension_numbers=_DN_CONV)
    return y + b


def conv_transpose2d_ref(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int,
                         output_padding: int = 0) -> jax.Array:
    """torch.nn.functional.conv_transpose2d: x (N, H, W, Cin), w (Cin, Cout, k, k).

    The adjoint of conv2d with the same weight: an input-dilated (lhs_dilation) convolution
    with the flipped kernel, padded by k-1-padding (plus output_padding at the far end).
    """
    k = w.shape[-1]
    pad = (k - 1 - padding, k - 1 - padding + output_padding)
    y = lax.conv_general_dilated(x, w[:, :, ::-1, ::-1], (1, 1), [pad, pad],
                                 lhs_dilation=(stride, stride), dimension_numbers=_DN_CONVT)
    return y + b


# ---------------------------------------------------------------- building blocks

def _conv(x, w, stride, padding):
    return lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=_DN_CONV)


def _conv_weight_grad(x, dy, w_shape, stride, padding):
    """d<conv(x, w), dy>/dw, from lax's own transpose rule (no input dilation)."""
    _, vjp = jax.vjp(lambda w: _conv(x, w, stride, padding), jnp.zeros(w_shape, x.dtype))
    return vjp(dy)[0]


def _subpixel_conv_transpose(x, w, stride, padding, output_padding):
    """conv_transpose2d (no bias) as one stride-1 convolution plus depth-to-space.

    Output row s*m + r of the uncropped result is sum_j x[m - j] w[s*j + r]: for each
    phase r a stride-1 correlation of x (padded by J-1) with the flipped taps w[r::s].
    """
    c_in, c_out, k, _ = w.shape
    n, h, wd, _ = x.shape
    s = stride
    taps = -(-k // s)  # J: taps per phase
    wp = jnp.pad(w, ((0, 0), (0, 0), (0, taps * s - k), (0, taps * s - k)))
    wp = wp.reshape(c_in, c_out, taps, s, taps, s)[:, :, ::-1, :, ::-1, :]
    w_phases = wp.transpose(3, 5, 1, 0, 2, 4).reshape(s * s * c_out, c_in, taps, taps)
    xp = jnp.pad(x, ((0, 0), (taps - 1, taps - 1), (taps - 1, taps - 1), (0, 0)))
    y = lax.conv_general_dilated(xp, w_phases, (1, 1), "VALID", dimension_numbers=_DN_CONV)
    hf, wf = h + taps - 1, wd + taps - 1
    y = y.reshape(n, hf, wf, s, s, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(n, hf * s, wf * s, c_out)
    ho = conv_transpose_out_size(h, k, s, padding, output_padding)
    wo = conv_transpose_out_size(wd, k, s, padding, output_padding)
    return y[:, padding:padding + ho, padding:padding + wo]


@functools.cache
def _placement(size: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """P[(oy, ox), (iy, ix), (i, j)] = 1 where output pixel (oy, ox) reads input (iy, ix)
    through kernel tap (i, j) of a square convolution."""
    out = conv_out_size(size, kernel, stride, padding)
    p = np.zeros((out, out, size, size, kernel, kernel), np.float32)
    for oy in range(out):
        for ox in range(out):
            for i in range(kernel):
                for j in range(kernel):
                    iy, ix = oy * stride - padding + i, ox * stride - padding + j
                    if 0 <= iy < size and 0 <= ix < size:
                        p[oy, ox, iy, ix, i, j] = 1.0
    return p


def _dense_conv(x, w, stride, padding):
    """conv2d as x_flat @ M, M (H*W*Cin, Ho*Wo*Cout) assembled from the kernel."""
    n, h, _, c_in = x.shape
    c_out, _, k, _ = w.shape
    p = _placement(h, k, stride, padding)
    ho = p.shape[0]
    m = jnp.einsum("yxhwij,ocij->hwcyxo", p, w).reshape(h * h * c_in, ho * ho * c_out)
    return (x.reshape(n, -1) @ m).reshape(n, ho, ho, c_out)


def _dense_conv_transpose(x, w, stride, padding, output_padding):
    """conv_transpose2d as x_flat @ M^T, M the dense matrix of the adjoint convolution."""
    n, h, _, c_in = x.shape
    _, c_out, k, _ = w.shape
    ho = conv_transpose_out_size(h, k, stride, padding, output_padding)
    p = _placement(ho, k, stride, padding)  # the convolution ho -> h
    m = jnp.einsum("hwyxij,coij->hwcyxo", p, w).reshape(h * h * c_in, ho * ho * c_out)
    return (x.reshape(n, -1) @ m).reshape(n, ho, ho, c_out)


def _is_tiny(x: jax.Array, size_out: int) -> bool:
    return x.shape[1] == x.shape[2] and (x.shape[1] * size_out) ** 2 <= DENSE_MAX_PIXEL_PAIRS


# ---------------------------------------------------------------- fast layers

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv2d_vjp(x, w, b, stride, padding):
    return _conv(x, w, stride, padding) + b


def _conv2d_fwd(x, w, b, stride, padding):
    return _conv2d_vjp(x, w, b, stride, padding), (x, w)


def _conv2d_bwd(stride, padding, res, dy):
    x, w = res
    k = w.shape[-1]
    output_padding = x.shape[1] - conv_transpose_out_size(dy.shape[1], k, stride, padding, 0)
    # torch's Conv2d weight (out, in) read as a ConvTranspose2d weight (in', out') is the adjoint
    dx = _subpixel_conv_transpose(dy, w, stride, padding, output_padding)
    return dx, _conv_weight_grad(x, dy, w.shape, stride, padding), dy.sum((0, 1, 2))


_conv2d_vjp.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_transpose2d_vjp(x, w, b, stride, padding, output_padding):
    return _subpixel_conv_transpose(x, w, stride, padding, output_padding) + b


def _conv_transpose2d_fwd(x, w, b, stride, padding, output_padding):
    return _conv_transpose2d_vjp(x, w, b, stride, padding, output_padding), (x, w)


def _conv_transpose2d_bwd(stride, padding, output_padding, res, dy):
    x, w = res
    # y = A^T x with A = conv2d(., w): dx = A dy, dw = d<A(dy), x>/dw
    dx = _conv(dy, w, stride, padding)
    return dx, _conv_weight_grad(dy, x, w.shape, stride, padding), dy.sum((0, 1, 2))


_conv_transpose2d_vjp.defvjp(_conv_transpose2d_fwd, _conv_transpose2d_bwd)


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int) -> jax.Array:
    """Same function as conv2d_ref, computed without input-dilated convolutions."""
    size_out = conv_out_size(x.shape[1], w.shape[-1], stride, padding)
    if _is_tiny(x, size_out):
        return _dense_conv(x, w, stride, padding) + b
    return _conv2d_vjp(x, w, b, stride, padding)


def conv_transpose2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int,
                     output_padding: int = 0) -> jax.Array:
    """Same function as conv_transpose2d_ref, computed without input-dilated convolutions."""
    size_out = conv_transpose_out_size(x.shape[1], w.shape[-1], stride, padding, output_padding)
    if _is_tiny(x, size_out):
        return _dense_conv_transpose(x, w, stride, padding, output_padding) + b
    return _conv_transpose2d_vjp(x, w, b, stride, padding, output_padding)
