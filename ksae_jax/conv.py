"""2-D convolutions with PyTorch's semantics and parameter layouts, on NHWC activations."""
from __future__ import annotations

import jax
from jax import lax

_DN_CONV = ("NHWC", "OIHW", "NHWC")  # torch Conv2d weight: (out, in, kh, kw)
_DN_CONVT = ("NHWC", "IOHW", "NHWC")  # torch ConvTranspose2d weight: (in, out, kh, kw)


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_out_size(size: int, kernel: int, stride: int, padding: int,
                            output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + kernel + output_padding


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


conv2d = conv2d_ref
conv_transpose2d = conv_transpose2d_ref
