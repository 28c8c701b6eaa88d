"""Frozen dataclasses that describe a run: one model config per family (ImageModel, SaeModel)
and the training config every family shares (SweepConfig); saved beside every result."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Union

import numpy as np

IMAGE_ARCHS = ("conv", "mlp")
SAE_ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu")
ARCHS = IMAGE_ARCHS + SAE_ARCHS
IMAGE_LOSSES = ("mse", "bce", "half_sse")
IMAGE_ACTIVATIONS = ("relu", "linear")
OPTIMIZERS = ("adam", "sgd")
DEFAULT_HIDDEN = {"conv": 256, "mlp": 1000}
DEFAULT_KS = (5, 10, 25, 50, 100)
DEFAULT_EPOCHS = 9
BATCHINGS = ("auto", "loop", "vmap")
DECODERS = ("auto", "native", "sparse", "dense")
INIT_DIRS = ("random", "data", "mixed", "diverse")
B_DEC_INITS = ("median", "mean", "zero")
B_ENC_INITS = ("zero", "balanced")
DTYPES = ("float32", "bfloat16")
N_PIXELS = 28 * 28


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def _finite_nonneg(name: str, v: Any) -> None:
    if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
        raise ValueError(f"{name} must be >= 0, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ImageModel:
    """A k-sparse autoencoder of 28 x 28 images (static shapes, and its loss)."""

    arch: str = "conv"
    """"conv" (the original PyTorch network) or "mlp" (Makhzani & Frey)."""
    hidden: int | None = None
    """Width of the code; None: 256 conv, 1000 mlp."""
    tied: bool = False
    """mlp only: the decoder weight is the encoder weight transposed."""
    loss: str = "mse"
    """"mse" (mean over pixels), "bce" (sigmoid output), or "half_sse" (0.5 * the sum over
    pixels of the squared error: Makhzani & Frey's code; the gradient is 392x the MSE's)."""
    l1: float = 1e-4
    """lambda of the L1 activation penalty (the original's; 0: pure k-sparse)."""
    dtype: str = "float32"
    """Compute dtype of the matmuls and convolutions ("bfloat16": bf16 inputs, f32
    accumulation; the weights and Adam stay float32)."""
    activation: str | None = None
    """The code's units before the top-k: "relu" or "linear"; None: relu conv (the
    original's), linear mlp (the paper's text; its released code has relu)."""
    init_std: float | None = None
    """None: PyTorch's default init; a number: every parameter, biases included, drawn from
    init_std * N(0, 1) (Makhzani & Frey's code: 0.01)."""

    def __post_init__(self):
        if self.arch not in IMAGE_ARCHS:
            raise ValueError(f"unknown image arch {self.arch!r}; expected one of {IMAGE_ARCHS}")
        if self.hidden is None:
            object.__setattr__(self, "hidden", DEFAULT_HIDDEN[self.arch])
        _positive_int("hidden", self.hidden)
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.loss not in IMAGE_LOSSES:
            raise ValueError(f"loss {self.loss!r} does not apply to images; expected one of "
                             f"{IMAGE_LOSSES}")
        if self.tied and self.arch != "mlp":
            raise ValueError("tied weights exist only for arch 'mlp' (--arch mlp --tied)")
        _finite_nonneg("l1", self.l1)
        _check_dtype(self.dtype)
        if self.activation is None:
            object.__setattr__(self, "activation", "relu" if self.arch == "conv" else "linear")
        if self.activation not in IMAGE_ACTIVATIONS:
            raise ValueError(f"activation must be one of {IMAGE_ACTIVATIONS}, got "
                             f"{self.activation!r}")
        if self.arch == "conv" and self.activation != "relu":
            raise ValueError("the conv network's units are relu (activation applies to mlp)")
        if self.init_std is not None and not (isinstance(self.init_std, (int, float))
                                              and 0 < self.init_std < math.inf):
            raise ValueError(f"init_std must be positive or None, got {self.init_std!r}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (28, 28)

    @property
    def input_width(self) -> int:
        return N_PIXELS

    def check_ks(self, ks) -> None:
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        for k in ks:
            check_k(k, self.hidden)

    def check_l0_coefs(self, l0_coefs) -> None:
        if l0_coefs:
            raise ValueError("l0_coefs are JumpReLU's; this model keeps k units")


@dataclasses.dataclass(frozen=True)
class SaeModel:
    """A sparse autoencoder of d_in-wide vectors (static shapes, and its loss terms)."""

    d_in: int
    """Width of the input vectors."""
    hidden: int | None = None
    """Latents n; None: 8 * d_in."""
    arch: str = "topk"
    """"topk" (Gao et al. 2024); the subclasses below are the other families."""
    decoder: str = "auto"
    """"sparse" (custom-VJP gather/scatter paths on XLA ops), "native" (the same on native_ops'
    CPU kernels), "dense" (plain autodiff) or "auto" (dense for large k / n, else native
    where the kernels serve the process, else sparse)."""
    multi_topk: bool = False
    """Add FVU at 4k (weight 1/8), as Gao et al."""
    normalize: bool = False
    """Scale the inputs by one constant so that the training rows' mean squared norm is d_in
    (the constant is stored with the params and applied by encode and decode)."""
    init_scale: float | str = "fit"
    """Norm of the encoder rows at init: W_enc = init_scale * W_dec, decoder rows unit
    vectors (1: Gao et al.'s W_enc = W_dec^T; sparsify's Kaiming-uniform encoder is about
    0.577; SAELens starts at 0.1); "fit" (the default): each model's scale is the one whose
    first reconstructions of training rows have the least squared error (it falls with k;
    README's LM table shows why it is the default)."""
    b_dec_init: str = "mean"
    """b_dec at init: the mean of training rows (the default, as sparsify: README's LM section
    shows why), their geometric median (Gao et al.), or zero."""
    b_enc_init: str = "balanced"
    """b_enc at init: zero, or "balanced" (the default: README's LM table shows why): each
    latent's threshold at its own (1 - k/n) quantile over training rows, so that every latent
    starts firing on about k/n of them (less a part of their mean: b_enc_mean_keep)."""
    b_enc_mean_keep: float = 0.5
    """b_enc_init "balanced": the share of the latents' mean threshold b_enc keeps. 1: each
    latent's own threshold (the chosen values start shrunk by it); 0: the thresholds less
    their mean (top-k chooses the same latents, at full value); 0.5, the default, between."""
    init_dirs: str = "random"
    """Decoder rows at init: "random" unit vectors (the default: with the balanced b_enc,
    README's LM table shows why); "data": the directions of n training rows (centred on
    b_dec), so that every latent starts as the best match of some row; "mixed": each such
    direction plus init_mix times a random unit one (the lowest FVU, but more dead latents);
    "diverse": data directions with no two closer than cosine 0.9 while the sample has enough."""
    init_mix: float = 1.0
    """init_dirs "mixed": the weight of the random unit direction added to each data one."""
    dtype: str = "float32"
    """Compute dtype of the dense matmuls ("bfloat16": bf16 inputs, f32 accumulation; the
    weights, Adam and the sparse gathers and scatters stay float32)."""

    def __post_init__(self):
        if self.arch != _SAE_ARCH_OF.get(type(self), self.arch):
            raise ValueError(f"{type(self).__name__} is arch {_SAE_ARCH_OF[type(self)]!r}, not "
                             f"{self.arch!r} (model_config picks the class by arch)")
        if self.arch not in SAE_ARCHS:
            raise ValueError(f"unknown SAE arch {self.arch!r}; expected one of {SAE_ARCHS}")
        _positive_int("d_in", self.d_in)
        object.__setattr__(self, "d_in", int(self.d_in))
        if self.hidden is None:
            object.__setattr__(self, "hidden", 8 * self.d_in)
        _positive_int("hidden", self.hidden)
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.init_scale != "fit" and not (isinstance(self.init_scale, (int, float))
                                             and 0 < self.init_scale < math.inf):
            raise ValueError(f"init_scale must be positive or 'fit', got {self.init_scale!r}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")
        if self.b_enc_init not in B_ENC_INITS:
            raise ValueError(f"b_enc_init must be one of {B_ENC_INITS}, got {self.b_enc_init!r}")
        if self.init_dirs not in INIT_DIRS:
            raise ValueError(f"init_dirs must be one of {INIT_DIRS}, got {self.init_dirs!r}")
        _finite_nonneg("init_mix", self.init_mix)
        if not 0 <= self.b_enc_mean_keep <= 1:
            raise ValueError(f"b_enc_mean_keep must lie in [0, 1], got {self.b_enc_mean_keep!r}")
        _check_dtype(self.dtype)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.d_in,)

    @property
    def input_width(self) -> int:
        return self.d_in

    def check_ks(self, ks) -> None:
        if not ks:
            raise ValueError("ks is empty: give at least one k")
        for k in ks:
            check_k(k, self.hidden)
            if self.multi_topk and 4 * k > self.hidden:
                raise ValueError(f"multi_topk needs 4k <= hidden; k={k} gives {4 * k} > "
                                 f"{self.hidden}")

    def check_l0_coefs(self, l0_coefs) -> None:
        if l0_coefs:
            raise ValueError(f"l0_coefs are JumpReLU's; {self.arch} keeps k latents (ks)")


@dataclasses.dataclass(frozen=True)
class BatchTopKModel(SaeModel):
    """BatchTopK (Bussmann et al. 2024): the top B k activations of a batch of B rows, not k
    per row; served as a JumpReLU with the threshold estimated in training."""

    arch: str = "batchtopk"
    threshold_lr: float = 0.01
    """The threshold used at inference moves this fraction of the way to each training
    batch's smallest kept activation (SAELens's running estimate)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must lie in (0, 1], got {self.threshold_lr!r}")


@dataclasses.dataclass(frozen=True)
class MatryoshkaModel(BatchTopKModel):
    """Matryoshka BatchTopK (Bussmann et al. 2025, Nabeshima 2025): every prefix of the
    latents reconstructs the input on its own; the losses of the prefixes add up."""

    arch: str = "matryoshka"
    prefixes: tuple[int, ...] = ()
    """Sizes of the nested prefixes below hidden (hidden itself is always the last); ():
    hidden / 16, / 4 and / 2."""

    def __post_init__(self):
        super().__post_init__()
        prefixes = tuple(int(p) if _is_int(p) else p for p in self.prefixes) or tuple(
            self.hidden // f for f in (16, 4, 2) if self.hidden // f > 0)
        for p in prefixes:
            _positive_int("prefix size", p)
        if list(prefixes) != sorted(set(prefixes)) or prefixes[-1] >= self.hidden:
            raise ValueError(f"prefixes must increase strictly and stay below the {self.hidden} "
                             f"latents, got {list(prefixes)}")
        object.__setattr__(self, "prefixes", prefixes)

    @property
    def widths(self) -> tuple[int, ...]:
        """Every nested width, the whole code last."""
        return self.prefixes + (self.hidden,)


@dataclasses.dataclass(frozen=True)
class JumpReLUModel(SaeModel):
    """JumpReLU (Rajamanoharan et al. 2024): a threshold per latent, z = pre H(pre - theta),
    trained through straight-through estimators with an L0 penalty; the sweep goes over the
    L0 coefficient (SweepConfig.l0_coefs) instead of k."""

    arch: str = "jumprelu"
    init_scale: float | str = 1.0
    """As SaeModel's, but 1 by default (a JumpReLU has no k to fit the scale to)."""
    b_enc_init: str = "zero"
    """As SaeModel's, but zero by default (its thresholds start at init_l0, not at a k)."""
    bandwidth: float = 0.05
    """Width of the rectangle kernel of the straight-through pseudo-gradients."""
    init_l0: int | None = None
    """The thresholds start where each latent fires on init_l0 / hidden of the training rows
    (None: 64, at most a quarter of the latents)."""
    threshold_lr_scale: float = 10.0
    """The thresholds' learning rate is the SAE's times this (they move L0, and only they
    see the L0 penalty's pseudo-gradient)."""

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.bandwidth, (int, float)) and 0 < self.bandwidth < math.inf):
            raise ValueError(f"bandwidth must be positive, got {self.bandwidth!r}")
        if self.init_l0 is None:
            object.__setattr__(self, "init_l0", max(1, min(64, self.hidden // 4)))
        check_k(self.init_l0, self.hidden, "init_l0")
        if not (isinstance(self.threshold_lr_scale, (int, float)) and self.threshold_lr_scale > 0):
            raise ValueError(f"threshold_lr_scale must be positive, got {self.threshold_lr_scale!r}")

    def check_ks(self, ks) -> None:
        if ks:
            raise ValueError("JumpReLU has no k: sweep its L0 coefficient (l0_coefs) instead")

    def check_l0_coefs(self, l0_coefs) -> None:
        if not l0_coefs:
            raise ValueError("l0_coefs is empty: give at least one L0 coefficient")
        for c in l0_coefs:
            if not (isinstance(c, (int, float)) and 0 <= c < math.inf):
                raise ValueError(f"an L0 coefficient must be a number >= 0, got {c!r}")


_SAE_ARCH_OF = {SaeModel: "topk", BatchTopKModel: "batchtopk", MatryoshkaModel: "matryoshka",
                JumpReLUModel: "jumprelu"}
SAE_MODELS = {arch: cls for cls, arch in _SAE_ARCH_OF.items()}
ModelConfig = Union[ImageModel, SaeModel]


def model_from_dict(d: dict) -> ModelConfig:
    """A model config from its dict; dicts written before the per-family configs (one
    ModelConfig with every field) are read too."""
    d = dict(d)
    if d.get("arch", "conv") in IMAGE_ARCHS:
        for old in ("d_in", "decoder"):
            d.pop(old, None)
        return ImageModel(**{**d, "loss": d.get("loss") or "mse"})
    d.pop("tied", None)
    d.pop("loss", None)
    d.setdefault("b_dec_init", "median")  # what every version before the field did
    if "prefixes" in d:
        d["prefixes"] = tuple(d["prefixes"])
    return SAE_MODELS[d.get("arch", "topk")](**d)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One training run, whatever the model family: every k in `ks` trained side by side in
    one compiled program.

    The budget is `steps` optimizer steps or `epochs` passes over the training data (one of
    the two; neither means the original's 9 epochs).
    """

    model: ModelConfig = ImageModel()
    """The family's model config (ImageModel or SaeModel)."""
    ks: tuple[int, ...] = DEFAULT_KS
    """One model per k (the k families; () for JumpReLU)."""
    l0_coefs: tuple[float, ...] = ()
    """JumpReLU: one model per coefficient of its L0 penalty."""
    epochs: int | None = None
    """Passes over the training data (exclusive with steps)."""
    steps: int | None = None
    """Optimizer steps (exclusive with epochs)."""
    batch_size: int = 600
    lr: float | tuple[float, ...] = 1e-3
    """Learning rate: one for all models, or one per k."""
    seed: int = 1
    """Data order, and every model's init unless init_seeds is given."""
    init_seeds: tuple[int, ...] | None = None
    """Per-model init seeds (default: every model starts from seed, as the original's runs)."""
    k_start: int | None = None
    """k schedule (Makhzani & Frey): each model starts at k_start ..."""
    k_anneal_frac: float = 0.0
    """... and moves linearly to its own k over this fraction of the budget."""
    batching: str = "auto"
    """How the models share the compiled step: "vmap", "loop" (one after another inside the
    step, each with its own static top-k width) or "auto" (by backend)."""
    optimizer: str = "adam"
    """"adam" (PyTorch's), or "sgd" (with momentum: v = momentum v + g, step -lr v)."""
    momentum: float = 0.9
    """SGD's momentum (unused by Adam)."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over the first steps."""
    lr_decay_frac: float = 0.0
    """Linear learning-rate decay to 0 over this last fraction of the budget (0: none)."""
    clip_norm: float | None = None
    """Clip each model's gradient to this global norm."""
    aux_coef: float = 0.0
    """Weight of the AuxK loss that revives dead latents (0: off)."""
    aux_k: int | None = None
    """Dead latents that reconstruct the residual in AuxK (None: input width // 2, at most
    hidden)."""
    dead_tokens: int | None = None
    """A latent is dead when it has not fired in this many training vectors (None: min(10M,
    one pass over the training data))."""
    resample_every: int = 0
    """SAEs: after every this many steps of the first half of the budget, the latents that
    have not fired since the last time start again along the batch's residuals (0: off)."""
    eval_every: int | None = None
    """Steps between evaluations and checkpoints (None: every epoch, or 10 per run when
    that is more than 20 epochs or less than one)."""

    def __post_init__(self):
        if not isinstance(self.model, (ImageModel, SaeModel)):
            raise ValueError(f"model must be an ImageModel or SaeModel, got {self.model!r}"[:200])
        object.__setattr__(self, "ks", tuple(int(k) if _is_int(k) else k for k in self.ks))
        object.__setattr__(self, "l0_coefs", tuple(float(c) if isinstance(c, (int, float))
                                                   else c for c in self.l0_coefs))
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        self.model.check_ks(self.ks)
        self.model.check_l0_coefs(self.l0_coefs)
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.label_name}s has repeated values: {list(self.labels)}")
        self._check_budget()
        self._check_optimizer()
        self._check_auxk()

    def _check_budget(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give steps or epochs, not both")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        for name in ("epochs", "steps", "eval_every"):
            _positive_int(name, getattr(self, name), allow_none=True)
        _positive_int("batch_size", self.batch_size)
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.init_seeds is not None:
            object.__setattr__(self, "init_seeds", tuple(int(s) for s in self.init_seeds))
            if len(self.init_seeds) != self.n_models:
                raise ValueError(f"init_seeds needs one seed per model ({self.n_models}), got "
                                 f"{len(self.init_seeds)}")
        if self.k_start is not None:
            check_k(self.k_start, self.model.hidden, name="k_start")
            if not self.ks:
                raise ValueError("k_start schedules k: this model has none")
        if not 0 <= self.k_anneal_frac <= 1:
            raise ValueError(f"k_anneal_frac must lie in [0, 1], got {self.k_anneal_frac!r}")

    def _check_optimizer(self):
        lrs = self.lr if isinstance(self.lr, (tuple, list)) else None
        if lrs is not None:
            object.__setattr__(self, "lr", tuple(float(v) for v in lrs))
            if len(self.lr) != self.n_models:
                raise ValueError(f"lr needs one value per model ({self.n_models}), got "
                                 f"{len(self.lr)}")
        for v in self.lrs:
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"lr must be positive, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not (0 < self.eps < math.inf):
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(f"lr_decay_frac must lie in [0, 1], got {self.lr_decay_frac!r}")
        if self.clip_norm is not None and not 0 < self.clip_norm < math.inf:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm!r}")

    def _check_auxk(self):
        _finite_nonneg("aux_coef", self.aux_coef)
        if self.aux_k is None:
            width = self.model.input_width
            object.__setattr__(self, "aux_k", min(max(width // 2, 1), self.model.hidden))
        check_k(self.aux_k, self.model.hidden, name="aux_k")
        _positive_int("dead_tokens", self.dead_tokens, allow_none=True)
        if not (_is_int(self.resample_every) and self.resample_every >= 0):
            raise ValueError(f"resample_every must be an integer >= 0, got {self.resample_every!r}")
        if self.resample_every and not isinstance(self.model, SaeModel):
            raise ValueError("resample_every: only SAEs resample their dead latents")

    @property
    def labels(self) -> tuple:
        """What names each model: its k, or its L0 coefficient (JumpReLU)."""
        return self.ks or self.l0_coefs

    @property
    def label_name(self) -> str:
        return "k" if self.ks else "l0_coef"

    @property
    def n_models(self) -> int:
        return len(self.labels)

    @property
    def lrs(self) -> tuple[float, ...]:
        """One learning rate per model."""
        return self.lr if isinstance(self.lr, tuple) else (self.lr,) * self.n_models

    @property
    def seeds(self) -> tuple[int, ...]:
        """One init seed per model."""
        return self.init_seeds or (self.seed,) * self.n_models

    @property
    def max_ks(self) -> tuple[int, ...]:
        """Per-model static width of lax.top_k (the k schedule's start included; 1 for
        models without a k)."""
        return tuple(max(k, self.k_start or 0) for k in self.ks) or (1,) * self.n_models

    @property
    def max_k(self) -> int:
        """Static width of lax.top_k when all models share one program (vmap)."""
        return max(self.max_ks)

    def select(self, indices) -> SweepConfig:
        """The config of a subset of the models (e.g. those that did not diverge)."""
        pick = lambda seq: tuple(seq[i] for i in indices)
        return dataclasses.replace(
            self, ks=pick(self.ks) if self.ks else (), l0_coefs=pick(self.l0_coefs) if self.l0_coefs
            else (), lr=pick(self.lr) if isinstance(self.lr, tuple) else self.lr,
            init_seeds=pick(self.init_seeds) if self.init_seeds else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SweepConfig:
        """The config a to_dict wrote; also reads the files of earlier versions (one
        ModelConfig for every arch with l1, multi_topk and normalize beside the budget)."""
        d = dict(d)
        model = dict(d.pop("model"))
        for moved in ("l1", "multi_topk", "normalize"):  # now fields of the family's model
            if moved in d:
                value = d.pop(moved)
                if moved in {f.name for f in dataclasses.fields(
                        ImageModel if model.get("arch", "conv") in IMAGE_ARCHS else SaeModel)}:
                    model[moved] = value
        if model.get("arch", "conv") not in IMAGE_ARCHS:  # files from before these fields were
            model.setdefault("init_scale", 1.0)         # trained with W_enc = W_dec, random rows
            model.setdefault("init_dirs", "random")
            model.setdefault("b_enc_init", "zero")
            model.setdefault("b_enc_mean_keep", 1.0)
        if "k_anneal_epochs" in d:  # files written before budgets in steps
            anneal = d.pop("k_anneal_epochs")
            d["k_anneal_frac"] = anneal / d["epochs"] if d.get("epochs") else 0.0
        tuples = ("ks", "l0_coefs", "init_seeds", "lr")
        return cls(model=model_from_dict(model),
                   **{k: tuple(v) if k in tuples and isinstance(v, list) else v
                      for k, v in d.items()})


def sae_config(d_in: int, ks, *, latents: int | None = None, **overrides) -> SweepConfig:
    """An SAE sweep (TopK unless arch= names another family) with the recipe of Gao et al.
    2024 as defaults: Adam eps 6.25e-10, lr 2e-4 / sqrt(latents / 2^14), AuxK with
    coefficient 1/32 over d_in / 2 dead latents, batch 4096. Overrides may name the model
    config's fields (arch, decoder, normalize, init_scale, prefixes, ...) and SweepConfig's."""
    cls = SAE_MODELS.get(overrides.get("arch", "topk"), SaeModel)
    model_fields = {f.name for f in dataclasses.fields(cls)} - {"d_in", "hidden"}
    model = cls(d_in, latents, **{k: overrides.pop(k) for k in model_fields & set(overrides)})
    defaults = dict(lr=2e-4 / math.sqrt(model.hidden / 2 ** 14), eps=6.25e-10, aux_coef=1 / 32,
                    batch_size=4096, seed=0)
    return SweepConfig(model=model, ks=tuple(ks), **{**defaults, **overrides})


def check_k(k: Any, hidden: int, name: str = "k") -> int:
    """Validates one k for a code of width `hidden`; returns it as a Python int."""
    if not _is_int(k):
        raise ValueError(f"{name} must be an integer, got {k!r}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be positive, got {name}={k}")
    if k > hidden:
        raise ValueError(f"{name}={k} is larger than the hidden width {hidden}")
    return k
