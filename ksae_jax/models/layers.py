"""Layers with PyTorch's parameter layouts, names and default initialisation (`weight`,
`bias`; Linear weight (out, in), Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw)),
so that the original's network is the same, parameter for parameter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ksae_jax.models import conv


def matmul(a, b, dtype: str = "float32"):
    """a @ b, in bfloat16 with float32 accumulation when dtype says so (float32 result)."""
    if dtype == "float32":
        return a @ b
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)


def _low(x, dtype: str):
    return x if dtype == "float32" else x.astype(jnp.bfloat16)


def _torch_uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5
    return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


class Linear(nnx.Module):
    def __init__(self, n_in: int, n_out: int, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.weight = _torch_uniform(rngs, (n_out, n_in), n_in)
        self.bias = _torch_uniform(rngs, (n_out,), n_in)
        self.dtype = dtype

    def __call__(self, x):
        return matmul(x, self.weight[...].T, self.dtype) + self.bias[...]


class Conv2d(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, *,
                 rngs: nnx.Rngs, dtype: str = "float32"):
        fan_in = c_in * kernel * kernel
        self.weight = _torch_uniform(rngs, (c_out, c_in, kernel, kernel), fan_in)
        self.bias = _torch_uniform(rngs, (c_out,), fan_in)
        self.stride, self.padding, self.dtype = stride, padding, dtype

    def __call__(self, x):
        d = self.dtype
        return conv.conv2d(_low(x, d), _low(self.weight[...], d), _low(self.bias[...], d),
                           self.stride, self.padding).astype(jnp.float32)


class ConvTranspose2d(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 output_padding: int = 0, *, rngs: nnx.Rngs, dtype: str = "float32"):
        fan_in = c_out * kernel * kernel  # torch computes fan_in from weight.size(1)
        self.weight = _torch_uniform(rngs, (c_in, c_out, kernel, kernel), fan_in)
        self.bias = _torch_uniform(rngs, (c_out,), fan_in)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dtype = dtype

    def __call__(self, x):
        d = self.dtype
        return conv.conv_transpose2d(_low(x, d), _low(self.weight[...], d), _low(self.bias[...], d),
                                     self.stride, self.padding, self.output_padding
                                     ).astype(jnp.float32)
