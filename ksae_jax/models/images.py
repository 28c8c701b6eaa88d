"""The image k-sparse autoencoders (the original conv network, Makhzani & Frey's MLP) as
Flax NNX modules.

Parameters follow PyTorch's layouts and names (`weight`, `bias`; Linear weight is
(out, in), Conv2d (out, in, kh, kw), ConvTranspose2d (in, out, kh, kw)) and PyTorch's
default initialisation, so the conv network is the original's, parameter for parameter.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ksae_jax.config import ModelConfig
from ksae_jax.models import conv
from ksae_jax.topk import sparsify

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
# The original's layers: (c_in, c_out, kernel, stride, padding[, output_padding])
ENCODER_CONVS = ((1, 16, 3, 2, 1), (16, 32, 3, 2, 1), (32, 64, 5, 2, 1))       # 28 -> 14 -> 7 -> 3
DECODER_CONVS = ((64, 32, 5, 2, 1, 0), (32, 16, 3, 2, 1, 1), (16, 1, 3, 2, 1, 1))  # 3 -> 7 -> 14 -> 28
BOTTLENECK = (64, 3, 3)  # channels, height, width between the convs and the Linear layers


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


class Output(NamedTuple):
    recon: jax.Array    # (B, 28, 28) reconstruction in image space
    logits: jax.Array   # (B, 28, 28) pre-activation of the output layer
    code: jax.Array     # (B, hidden) k-sparse code
    acts: tuple         # activations the L1 penalty is taken over


class ConvKSAE(nnx.Module):
    """The original network: conv 16/32/64 -> Linear 576->H -> top-k -> mirrored decoder.

    ReLU after every layer, the output included (sigmoid instead with loss='bce').
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.loss = cfg.loss
        flat = int(np.prod(BOTTLENECK))  # 576
        self.enc1, self.enc2, self.enc3 = (Conv2d(*spec, rngs=rngs) for spec in ENCODER_CONVS)
        self.enc4 = Linear(flat, cfg.hidden, rngs=rngs)
        self.dec1 = Linear(cfg.hidden, flat, rngs=rngs)
        self.dec2, self.dec3, self.dec4 = (ConvTranspose2d(*spec, rngs=rngs) for spec in DECODER_CONVS)

    def encode_dense(self, x):
        """Images (B, 28, 28) -> (dense code (B, H), encoder conv activations)."""
        h1 = jax.nn.relu(self.enc1(x[..., None]))
        h2 = jax.nn.relu(self.enc2(h1))
        h3 = jax.nn.relu(self.enc3(h2))
        flat = h3.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # torch's (c, h, w) order
        return jax.nn.relu(self.enc4(flat)), (h1, h2, h3)

    def decode_all(self, code):
        """Code (B, H) -> (reconstruction, logits, decoder activations)."""
        d1 = jax.nn.relu(self.dec1(code))
        d2 = jax.nn.relu(self.dec2(d1.reshape(-1, *BOTTLENECK).transpose(0, 2, 3, 1)))
        d3 = jax.nn.relu(self.dec3(d2))
        logits = self.dec4(d3)[..., 0]
        recon = jax.nn.sigmoid(logits) if self.loss == "bce" else jax.nn.relu(logits)
        return recon, logits, (d1, d2, d3, recon)

    def __call__(self, x, k, max_k: int) -> Output:
        dense, enc_acts = self.encode_dense(x)
        code = sparsify(dense, k, max_k)
        recon, logits, dec_acts = self.decode_all(code)
        return Output(recon, logits, code, enc_acts + (code,) + dec_acts)


class MlpKSAE(nnx.Module):
    """Makhzani & Frey: 784 -> H linear units -> top-k -> 784, decoder tied or untied."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.loss, self.tied = cfg.loss, cfg.tied
        self.enc = Linear(N_PIXELS, cfg.hidden, rngs=rngs)
        if cfg.tied:
            self.dec_bias = nnx.Param(jnp.zeros((N_PIXELS,), jnp.float32))
        else:
            self.dec = Linear(cfg.hidden, N_PIXELS, rngs=rngs)

    def encode_dense(self, x):
        return self.enc(x.reshape(x.shape[0], -1)), ()

    def decode_all(self, code):
        if self.tied:
            logits = code @ self.enc.weight[...] + self.dec_bias[...]
        else:
            logits = self.dec(code)
        logits = logits.reshape(-1, *IMAGE_SHAPE)
        recon = jax.nn.sigmoid(logits) if self.loss == "bce" else logits
        return recon, logits, ()

    def __call__(self, x, k, max_k: int) -> Output:
        dense, _ = self.encode_dense(x)
        code = sparsify(dense, k, max_k)
        recon, logits, _ = self.decode_all(code)
        return Output(recon, logits, code, (code,))


def count_params(params: dict) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def forward_flops(cfg: ModelConfig) -> int:
    """Multiply-add FLOPs (2 per MAC) of one image's forward pass, counted from the layer
    shapes (dense code: the top-k does not shrink the matmuls as computed)."""
    if cfg.arch == "mlp":
        return 2 * 2 * N_PIXELS * cfg.hidden
    macs, size = 0, IMAGE_SHAPE[0]
    for c_in, c_out, k, s, p in ENCODER_CONVS:
        size = conv.conv_out_size(size, k, s, p)
        macs += size * size * c_out * c_in * k * k
    macs += 2 * int(np.prod(BOTTLENECK)) * cfg.hidden
    for c_in, c_out, k, s, p, op in DECODER_CONVS:
        macs += size * size * c_in * c_out * k * k  # every input pixel scatters a k x k patch
        size = conv.conv_transpose_out_size(size, k, s, p, op)
    return 2 * macs
