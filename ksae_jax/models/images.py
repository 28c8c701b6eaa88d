"""The image family: k-sparse autoencoders of 28 x 28 images, the original conv network and
Makhzani & Frey's MLP: their config (`ImageModel`), Flax NNX modules (PyTorch's layouts and
init, see layers), their one forward pass, their loss terms (reconstruction error + lambda *
L1; AuxK on the code is the train step's), and `Autoencoder`, the trained models for
inference. Registered as arch "conv" and "mlp"."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ksae_jax import checks, losses
from ksae_jax.data.feed import ArrayRows
from ksae_jax.models import conv
from ksae_jax.models.family import Family, LossTerms, ModelConfig
from ksae_jax.models.layers import Conv2d, ConvTranspose2d, Linear, matmul
from ksae_jax.models.loaded import Loaded
from ksae_jax.models.registry import register
from ksae_jax.topk import k_sparse, top_k_mask

IMAGE_SHAPE = (28, 28)
N_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
# The original's layers: (c_in, c_out, kernel, stride, padding[, output_padding])
ENCODER_CONVS = ((1, 16, 3, 2, 1), (16, 32, 3, 2, 1), (32, 64, 5, 2, 1))       # 28 -> 14 -> 7 -> 3
DECODER_CONVS = ((64, 32, 5, 2, 1, 0), (32, 16, 3, 2, 1, 1), (16, 1, 3, 2, 1, 1))  # 3 -> 7 -> 14 -> 28
BOTTLENECK = (64, 3, 3)  # channels, height, width between the convs and the Linear layers


@dataclasses.dataclass(frozen=True)
class ImageModel(ModelConfig):
    """A k-sparse autoencoder of 28 x 28 images (static shapes, and its loss)."""

    arch: Literal["conv", "mlp"] = "conv"
    """"conv" (the original PyTorch network) or "mlp" (Makhzani & Frey)."""
    hidden: int | None = None
    """Width of the code; None: 256 conv, 1000 mlp."""
    tied: bool = False
    """mlp only: the decoder weight is the encoder weight transposed."""
    loss: Literal["mse", "bce", "half_sse"] = "mse"
    """"mse" (mean over pixels), "bce" (sigmoid output), or "half_sse" (0.5 * the sum over
    pixels of the squared error: Makhzani & Frey's code; the gradient is 392x the MSE's)."""
    l1: float = 1e-4
    """lambda of the L1 activation penalty (the original's; 0: pure k-sparse)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype of the matmuls and convolutions ("bfloat16": bf16 inputs, f32
    accumulation; the weights and Adam stay float32)."""
    activation: Literal["relu", "linear"] | None = None
    """The code's units before the top-k: "relu" or "linear"; None: relu conv (the
    original's), linear mlp (the paper's text; its released code has relu)."""
    init_std: float | None = None
    """None: PyTorch's default init; a number: every parameter, biases included, drawn from
    init_std * N(0, 1) (Makhzani & Frey's code: 0.01)."""

    default_sweep: ClassVar[tuple] = (5, 10, 25, 50, 100)
    training_defaults: ClassVar[dict] = {"batch_size": 600, "seed": 1, "adam_eps": 1e-8}
    DEFAULT_HIDDEN: ClassVar[dict] = {"conv": 256, "mlp": 1000}

    def __post_init__(self):
        checks.choice(self, "arch", "loss", "dtype", "activation")
        if self.hidden is None:
            object.__setattr__(self, "hidden", self.DEFAULT_HIDDEN[self.arch])
        checks.positive_int("hidden", self.hidden)
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.tied and self.arch != "mlp":
            raise ValueError("tied weights exist only for arch 'mlp' (--arch mlp --tied)")
        checks.finite_nonneg("l1", self.l1)
        if self.activation is None:
            object.__setattr__(self, "activation", "relu" if self.arch == "conv" else "linear")
        if self.arch == "conv" and self.activation != "relu":
            raise ValueError("the conv network's units are relu (activation applies to mlp)")
        checks.positive("init_std", self.init_std, allow_none=True)
        super().__post_init__()

    @property
    def latents(self) -> int:
        return self.hidden

    @property
    def input_shape(self) -> tuple[int, ...]:
        return IMAGE_SHAPE

    def default_lr(self) -> float:
        """Adam's 1e-3, the original's."""
        return 1e-3


class ImageOutput(NamedTuple):
    """One forward pass of an image model on a batch."""

    recon: jax.Array
    """(B, 28, 28) reconstruction in image space."""
    logits: jax.Array
    """(B, 28, 28) pre-activation of the output layer."""
    code: jax.Array
    """(B, latents) k-sparse code."""
    dense: jax.Array
    """(B, latents) the code before the top-k (what the top-k chose from)."""
    acts: tuple
    """The activations the L1 penalty is taken over (every layer's output, the code's too)."""
    rec: jax.Array | None = None
    """Reconstruction error (MSE or BCE, the model's loss) averaged over real rows."""
    mse: jax.Array | None = None
    """Mean squared error over real rows (= rec for the mse loss)."""
    l1: jax.Array | None = None
    """L1 activation penalty averaged over real rows (before lambda)."""
    auxk: jax.Array | None = None
    """AuxK loss of the dead code units (0 without a dead mask)."""


class ImageKSAE(nnx.Module):
    """The forward pass both image networks share; they give encode_dense and decode_all."""

    loss: str
    aux_k: int

    def encode_dense(self, x) -> tuple[jax.Array, tuple]:
        raise NotImplementedError

    def decode_all(self, code) -> tuple[jax.Array, jax.Array, tuple]:
        raise NotImplementedError

    def __call__(self, x, w, hp, max_k: int, *, dead=None, terms=True) -> ImageOutput:
        dense, enc_acts = self.encode_dense(x)
        code = k_sparse(dense, hp["k"], max_k)
        recon, logits, dec_acts = self.decode_all(code)
        acts = enc_acts + (code,) + dec_acts
        if not terms:
            return ImageOutput(recon, logits, code, dense, acts)
        rec = losses.weighted_mean(losses.reconstruction_error(recon, logits, x, self.loss), w)
        mse = rec if self.loss == "mse" else losses.weighted_mean(
            losses.per_example_mean(jnp.square(recon - x)), w)
        l1 = losses.weighted_mean(losses.l1_penalty(acts), w)
        aux = None if dead is None else self.auxk(x, w, recon, dense, dead, self.aux_k)
        return ImageOutput(recon, logits, code, dense, acts, rec, mse, l1, aux)

    def auxk(self, x, w, recon, dense, dead, aux_k: int):
        """AuxK on the code layer: the aux_k largest dead units decode the residual."""
        def select_dead(dead):
            values, idx = lax.top_k(jnp.where(dead, dense, -jnp.inf), aux_k)
            return jnp.where(dead[idx], jax.nn.relu(values), 0.0), idx

        def decode_dead(values, idx):
            rows = jnp.arange(idx.shape[0])[:, None]
            z = jnp.zeros_like(dense).at[rows, idx].add(values)
            return self.decode_all(z)[0] - self.decode_all(jnp.zeros_like(dense))[0]

        return losses.auxk_loss(select_dead, decode_dead, x, w, recon, dead, aux_k,
                                losses.total_variance(x, w))


class ConvKSAE(ImageKSAE):
    """The original network: conv 16/32/64 -> Linear 576->H -> top-k -> mirrored decoder.

    ReLU after every layer, the output included (sigmoid instead with loss='bce').
    """

    def __init__(self, cfg: ImageModel, *, rngs: nnx.Rngs):
        self.loss, self.aux_k = cfg.loss, cfg.aux_k
        flat = int(np.prod(BOTTLENECK))  # 576
        kw = dict(rngs=rngs, dtype=cfg.dtype)
        self.enc1, self.enc2, self.enc3 = (Conv2d(*spec, **kw) for spec in ENCODER_CONVS)
        self.enc4 = Linear(flat, cfg.hidden, **kw)
        self.dec1 = Linear(cfg.hidden, flat, **kw)
        self.dec2, self.dec3, self.dec4 = (ConvTranspose2d(*spec, **kw) for spec in DECODER_CONVS)

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


class MlpKSAE(ImageKSAE):
    """Makhzani & Frey: 784 -> H linear (or relu) units -> top-k -> 784, decoder tied or
    untied, linear output (sigmoid with loss='bce')."""

    def __init__(self, cfg: ImageModel, *, rngs: nnx.Rngs):
        self.loss, self.tied, self.dtype, self.aux_k = cfg.loss, cfg.tied, cfg.dtype, cfg.aux_k
        self.relu = cfg.activation == "relu"
        self.enc = Linear(N_PIXELS, cfg.hidden, rngs=rngs, dtype=cfg.dtype)
        if cfg.tied:
            self.dec_bias = nnx.Param(jnp.zeros((N_PIXELS,), jnp.float32))
        else:
            self.dec = Linear(cfg.hidden, N_PIXELS, rngs=rngs, dtype=cfg.dtype)

    def encode_dense(self, x):
        h = self.enc(x.reshape(x.shape[0], -1))
        return (jax.nn.relu(h) if self.relu else h), ()

    def decode_all(self, code):
        if self.tied:
            logits = matmul(code, self.enc.weight[...], self.dtype) + self.dec_bias[...]
        else:
            logits = self.dec(code)
        logits = logits.reshape(-1, *IMAGE_SHAPE)
        recon = jax.nn.sigmoid(logits) if self.loss == "bce" else logits
        return recon, logits, ()


class ImageFamily(Family):
    """conv and mlp: uint8 images in, MSE (or BCE) + lambda * L1 out."""

    unit = "images"
    rec_name = "mse"

    def module(self, rngs):
        return (ConvKSAE if self.model.arch == "conv" else MlpKSAE)(self.model, rngs=rngs)

    def init(self, key):
        """PyTorch's init, or with init_std every parameter init_std * N(0, 1)."""
        params = super().init(key)
        if self.model.init_std is None:
            return params
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        return jax.tree.unflatten(tree, [self.model.init_std * jax.random.normal(k, a.shape, a.dtype)
                                         for k, a in zip(keys, leaves)])

    def hyperparameters(self, cfg):
        return {"l1": np.full(cfg.n_models, self.model.l1, np.float32)}

    def loss_terms(self, out, hp):
        return LossTerms(out.rec, hp["l1"] * out.l1)

    def fired(self, out, w):
        return jnp.any((out.code != 0) & (w[:, None] > 0), axis=0)

    def eval_sums(self, out, x, w):
        sse = jnp.sum(jnp.square(out.recon - x).reshape(x.shape[0], -1).sum(-1) * w)
        return {"sse": sse, "counts": jnp.sum((out.code != 0) * w[:, None], axis=0)}

    def rows(self, data, name):
        if isinstance(data, ArrayRows):
            return data
        a = np.asarray(data)
        if a.ndim != 3 or a.shape[1:] != IMAGE_SHAPE or a.dtype != np.uint8 or len(a) == 0:
            raise ValueError(f"{name} must be a non-empty uint8 array of shape (N, 28, 28), got "
                             f"{a.dtype} {a.shape}")
        return ArrayRows(a, 1 / 255)

    def code(self, out):
        return out.code

    def decode(self, params, code):
        return self.bind(params).decode_all(code)[0]

    def usage(self, out, hp, max_k):
        return (top_k_mask(out.dense, hp["k"], max_k) * (out.dense != 0)).sum(axis=0)


class Autoencoder(Loaded):
    """Image models (conv, mlp): inputs uint8 pixels 0..255 or floats in [0, 1], (N, 28, 28)."""

    def _inputs(self, images) -> np.ndarray:
        return as_images(images)

    def decoder_features(self, images, k: int, n: int = 100):
        """What each of the n most used units draws alone: decode(a e_j) - decode(0).

        a is the unit's mean active value on `images`. Returns (features (n, 28, 28),
        unit indices, usage counts of all units).
        """
        code = self.encode(images, k)
        counts = self.unit_usage(images, k)
        units = np.argsort(-counts, kind="stable")[:n]
        active = (code != 0).sum(axis=0)
        scale = np.where(active > 0, np.abs(code).sum(axis=0) / np.maximum(active, 1), 1.0)
        one_hot = np.zeros((len(units), code.shape[1]), np.float32)
        one_hot[np.arange(len(units)), units] = scale[units]
        base = self.decode(np.zeros((1, code.shape[1]), np.float32), k)
        return self.decode(one_hot, k) - base, units, counts


def as_images(images, name: str = "images") -> np.ndarray:
    """(N, 28, 28) float32 in [0, 1] from uint8 pixels 0..255 or floats in [0, 1]; one image
    may omit N. Anything else is refused with what is expected."""
    a = np.asarray(images)
    if a.shape == IMAGE_SHAPE:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape (N, 28, 28) or (28, 28), got {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype.kind != "f":
        raise ValueError(f"{name} must be uint8 pixels (0..255) or floats in [0, 1], got dtype "
                         f"{a.dtype}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} hold NaN or Inf pixels")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name}: float pixels must lie in [0, 1], got [{a.min():g}, {a.max():g}] "
                         "(for 0..255 values pass uint8, or divide by 255)")
    return a


def count_params(params: dict) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def forward_flops(cfg: ImageModel) -> int:
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


register("conv", ImageModel, ImageFamily, Autoencoder)
register("mlp", ImageModel, ImageFamily, Autoencoder)
