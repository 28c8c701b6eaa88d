"""Layers with PyTorch's parameter layouts, names and default initialisation (`weight`,
`bias`; Linear weight (out, in), Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw)),
so that the original's network is the same, parameter for parameter."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ksae_jax.models import conv


def _torch_uniform(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int) -> nnx.Param:
    """PyTorch's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in ** 0.5
    return nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))


class Linear(nnx.Module):
    def __init__(self, n_in: int, n_out: int, *, rngs: nnx.Rngs):
        self.weight = _torch_uniform(rngs, (n_out, n_in), n_in)
        self.bias = _torch_uniform(rngs, (n_out,), n_in)

    def __call__(self, x):
        return x @ self.weight[...].T + self.bias[...]


class Conv2d(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, *,
                 rngs: nnx.Rngs):
        fan_in = c_in * kernel * kernel
        self.weight = _torch_uniform(rngs, (c_out, c_in, kernel, kernel), fan_in)
        self.bias = _torch_uniform(rngs, (c_out,), fan_in)
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        return conv.conv2d(x, self.weight[...], self.bias[...], self.stride, self.padding)


class ConvTranspose2d(nnx.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int,
                 output_padding: int = 0, *, rngs: nnx.Rngs):
        fan_in = c_out * kernel * kernel  # torch computes fan_in from weight.size(1)
        self.weight = _torch_uniform(rngs, (c_in, c_out, kernel, kernel), fan_in)
        self.bias = _torch_uniform(rngs, (c_out,), fan_in)
        self.stride, self.padding, self.output_padding = stride, padding, output_padding

    def __call__(self, x):
        return conv.conv_transpose2d(x, self.weight[...], self.bias[...], self.stride,
                                     self.padding, self.output_padding)
