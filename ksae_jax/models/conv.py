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

Where native_ops' kernels serve (float32, one CPU device) every layer is instead one matmul
with its patches (im2col), gathered by a native kernel from a table of which input pixel
each output pixel reads through each tap; the adjoint (col2im, for the transposed
convolution and the gradients) is the same kernel with the inverted table.

Each is tested against the lax reference, forward and gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ksae_jax import native_ops

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
def _window_table(size: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """T[(oy, ox, i, j)] = the input pixel iy * size + ix that output pixel (oy, ox) reads
    through kernel tap (i, j) of a square convolution, -1 where that is padding; (P, 1)."""
    out = conv_out_size(size, kernel, stride, padding)
    o, i = np.arange(out)[:, None], np.arange(kernel)[None, :]
    rows = o * stride - padding + i  # (out, kernel): the input row (or column) read
    ok = (rows >= 0) & (rows < size)
    pix = rows[:, None, :, None] * size + rows[None, :, None, :]
    valid = ok[:, None, :, None] & ok[None, :, None, :]
    return np.where(valid, pix, -1).astype(np.int32).reshape(-1, 1)


@functools.cache
def _reader_table(size: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """The inverse of _window_table: row q lists the patch entries that read input pixel q,
    padded with -1; (size * size, most readers of one pixel)."""
    reads = _window_table(size, kernel, stride, padding)[:, 0]
    readers = [np.flatnonzero(reads == q) for q in range(size * size)]
    table = np.full((size * size, max(map(len, readers))), -1, np.int32)
    for q, r in enumerate(readers):
        table[q, :len(r)] = r
    return table


@functools.cache
def _placement(size: int, kernel: int, stride: int, padding: int) -> np.ndarray:
    """P[(oy, ox), (iy, ix), (i, j)] = 1 where output pixel (oy, ox) reads input (iy, ix)
    through kernel tap (i, j) of a square convolution."""
    out = conv_out_size(size, kernel, stride, padding)
    reads = _window_table(size, kernel, stride, padding).reshape(out, out, 1, kernel, kernel)
    p = reads == np.arange(size * size)[:, None, None]
    return p.reshape(out, out, size, size, kernel, kernel).astype(np.float32)


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


# ---------------------------------------------------------------- native im2col layers

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather_patches(src, geometry, adjoint):
    """(N, pixels, C) -> the patches (N, out pixels * taps, C) of a square convolution of
    `geometry` (size, kernel, stride, padding), or with `adjoint` their col2im back."""
    table = (_reader_table if adjoint else _window_table)(*geometry)
    return native_ops.pixel_gather(src, table)


def _gather_patches_fwd(src, geometry, adjoint):
    return _gather_patches(src, geometry, adjoint), None


def _gather_patches_bwd(geometry, adjoint, _, g):
    return (_gather_patches(g, geometry, not adjoint),)


_gather_patches.defvjp(_gather_patches_fwd, _gather_patches_bwd)


def _weight_matrix(w):
    """torch Conv2d weight (out, in, k, k) -> (k * k * in, out), rows in patch order."""
    c_out, c_in, k, _ = w.shape
    return w.transpose(2, 3, 1, 0).reshape(k * k * c_in, c_out)


def _im2col_conv(x, w, stride, padding):
    n, h, _, c_in = x.shape
    c_out, _, k, _ = w.shape
    ho = conv_out_size(h, k, stride, padding)
    cols = _gather_patches(x.reshape(n, h * h, c_in), (h, k, stride, padding), False)
    return (cols.reshape(n * ho * ho, -1) @ _weight_matrix(w)).reshape(n, ho, ho, c_out)


def _im2col_conv_transpose(x, w, stride, padding, output_padding):
    """The adjoint of _im2col_conv: x @ W^T per input pixel, then col2im."""
    n, h, _, c_in = x.shape
    _, c_out, k, _ = w.shape
    ho = conv_transpose_out_size(h, k, stride, padding, output_padding)
    cols = (x.reshape(n * h * h, c_in) @ _weight_matrix(w).T).reshape(n, h * h * k * k, c_out)
    return _gather_patches(cols, (ho, k, stride, padding), True).reshape(n, ho, ho, c_out)


def _native(x, w, native: bool) -> bool:
    return native and x.shape[1] == x.shape[2] and native_ops.takes(x, w)


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


def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int,
           native: bool = True) -> jax.Array:
    """Same function as conv2d_ref, computed without input-dilated convolutions: with
    `native`, as im2col + matmul where native_ops' kernels serve the operands."""
    if _native(x, w, native):
        return _im2col_conv(x, w, stride, padding) + b
    size_out = conv_out_size(x.shape[1], w.shape[-1], stride, padding)
    if _is_tiny(x, size_out):
        return _dense_conv(x, w, stride, padding) + b
    return _conv2d_vjp(x, w, b, stride, padding)


def conv_transpose2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, padding: int,
                     output_padding: int = 0, native: bool = True) -> jax.Array:
    """Same function as conv_transpose2d_ref, computed without input-dilated convolutions:
    with `native`, as matmul + col2im where native_ops' kernels serve the operands."""
    if _native(x, w, native):
        return _im2col_conv_transpose(x, w, stride, padding, output_padding) + b
    size_out = conv_transpose_out_size(x.shape[1], w.shape[-1], stride, padding, output_padding)
    if _is_tiny(x, size_out):
        return _dense_conv_transpose(x, w, stride, padding, output_padding) + b
    return _conv_transpose2d_vjp(x, w, b, stride, padding, output_padding)
