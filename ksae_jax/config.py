"""Frozen dataclasses that describe a model and a k sweep; saved beside every result."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

IMAGE_ARCHS = ("conv", "mlp")
ARCHS = IMAGE_ARCHS + ("topk",)
LOSSES = {"conv": ("mse", "bce"), "mlp": ("mse", "bce"), "topk": ("fvu",)}
DEFAULT_HIDDEN = {"conv": 256, "mlp": 1000}
DEFAULT_KS = (5, 10, 25, 50, 100)
DEFAULT_EPOCHS = 9
BATCHINGS = ("auto", "loop", "vmap")
DECODERS = ("auto", "sparse", "dense")
N_PIXELS = 28 * 28


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape-defining (static) description of one k-sparse autoencoder."""

    arch: str = "conv"
    """"conv" (the original PyTorch network), "mlp" (Makhzani & Frey) or "topk" (a TopK
    sparse autoencoder on vectors, Gao et al. 2024)."""
    hidden: int | None = None
    """Width of the code (latents); None: 256 conv, 1000 mlp, 8 * d_in topk."""
    tied: bool = False
    """mlp only: the decoder weight is the encoder weight transposed."""
    loss: str | None = None
    """"mse" or "bce" (sigmoid output) for images, "fvu" for topk; None: mse / fvu."""
    d_in: int | None = None
    """topk: width of the input vectors (images are always 28 x 28)."""
    decoder: str = "auto"
    """topk: "sparse" (custom-VJP gather/scatter paths), "dense" (plain autodiff) or "auto"."""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {ARCHS}")
        if self.arch == "topk":
            _positive_int("d_in", self.d_in)
            object.__setattr__(self, "d_in", int(self.d_in))
        elif self.d_in not in (None, N_PIXELS):
            raise ValueError(f"d_in is fixed at {N_PIXELS} for arch {self.arch!r}")
        if self.hidden is None:
            hidden = 8 * self.d_in if self.arch == "topk" else DEFAULT_HIDDEN[self.arch]
            object.__setattr__(self, "hidden", hidden)
        _positive_int("hidden", self.hidden)
        object.__setattr__(self, "hidden", int(self.hidden))
        if self.loss is None:
            object.__setattr__(self, "loss", LOSSES[self.arch][0])
        if self.loss not in LOSSES[self.arch]:
            raise ValueError(f"loss {self.loss!r} does not apply to arch {self.arch!r}; "
                             f"expected one of {LOSSES[self.arch]}")
        if self.tied and self.arch != "mlp":
            raise ValueError("tied weights exist only for arch='mlp'")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")

    @property
    def is_image(self) -> bool:
        return self.arch in IMAGE_ARCHS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (28, 28) if self.is_image else (self.d_in,)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One training run: every k in `ks` trained side by side in one compiled program.

    The budget is `steps` optimizer steps or `epochs` passes over the training data (one of
    the two; neither means the original's 9 epochs).
    """

    model: ModelConfig = ModelConfig()
    ks: tuple[int, ...] = DEFAULT_KS
    """One model per k."""
    epochs: int | None = None
    """Passes over the training data (exclusive with steps)."""
    steps: int | None = None
    """Optimizer steps (exclusive with epochs)."""
    batch_size: int = 600
    lr: float | tuple[float, ...] = 1e-3
    """Adam learning rate: one for all models, or one per k."""
    l1: float = 1e-4
    """Images: lambda of the L1 activation penalty (the original's)."""
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
    step, each with its own static top-k width) or "auto" (chosen by arch and backend)."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over the first steps."""
    clip_norm: float | None = None
    """Clip each model's gradient to this global norm."""
    aux_coef: float = 0.0
    """Weight of the AuxK loss that revives dead latents (0: off)."""
    aux_k: int | None = None
    """Dead latents that reconstruct the residual in AuxK (None: d_in // 2, at most hidden)."""
    dead_tokens: int | None = None
    """A latent is dead when it has not fired in this many training vectors (None: min(10M,
    one pass over the training data))."""
    multi_topk: bool = False
    """topk: add FVU at 4k (weight 1/8), as Gao et al."""
    normalize: bool = False
    """topk: divide the inputs by one constant so that their mean squared norm is d_in."""
    eval_every: int | None = None
    """Steps between evaluations and checkpoints (None: every epoch, or 10 per run when
    that is more than 20 epochs or less than one)."""

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) if _is_int(k) else k for k in self.ks))
        if self.batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {BATCHINGS}, got {self.batching!r}")
        if not self.ks:
            raise ValueError("ks is empty: give at least one k")
        for k in self.ks:
            check_k(k, self.model.hidden)
        if len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks has repeated values: {list(self.ks)}")
        self._check_budget()
        self._check_optimizer()
        self._check_recipe()

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
            if len(self.init_seeds) != len(self.ks):
                raise ValueError(f"init_seeds needs one seed per k ({len(self.ks)}), got "
                                 f"{len(self.init_seeds)}")
        if self.k_start is not None:
            check_k(self.k_start, self.model.hidden)
        if not 0 <= self.k_anneal_frac <= 1:
            raise ValueError(f"k_anneal_frac must lie in [0, 1], got {self.k_anneal_frac!r}")

    def _check_optimizer(self):
        lrs = self.lr if isinstance(self.lr, (tuple, list)) else None
        if lrs is not None:
            object.__setattr__(self, "lr", tuple(float(v) for v in lrs))
            if len(self.lr) != len(self.ks):
                raise ValueError(f"lr needs one value per k ({len(self.ks)}), got {len(self.lr)}")
        for v in self.lrs:
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"lr must be positive, got {v!r}")
        if not (0 < self.eps < math.inf):
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if not (_is_int(self.warmup_steps) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.clip_norm is not None and not 0 < self.clip_norm < math.inf:
            raise ValueError(f"clip_norm must be positive, got {self.clip_norm!r}")

    def _check_recipe(self):
        if not 0 <= self.l1 < math.inf:
            raise ValueError(f"l1 must be >= 0, got {self.l1!r}")
        if not 0 <= self.aux_coef < math.inf:
            raise ValueError(f"aux_coef must be >= 0, got {self.aux_coef!r}")
        if self.aux_k is None:
            width = self.model.d_in or N_PIXELS
            object.__setattr__(self, "aux_k", min(max(width // 2, 1), self.model.hidden))
        check_k(self.aux_k, self.model.hidden, name="aux_k")
        _positive_int("dead_tokens", self.dead_tokens, allow_none=True)
        if self.model.is_image and (self.multi_topk or self.normalize):
            raise ValueError("multi_topk and normalize apply to arch 'topk' only")
        if self.multi_topk:
            for k in self.ks:
                if 4 * k > self.model.hidden:
                    raise ValueError(f"multi_topk needs 4k <= hidden; k={k} gives {4 * k} > "
                                     f"{self.model.hidden}")

    @property
    def lrs(self) -> tuple[float, ...]:
        """One learning rate per model."""
        return self.lr if isinstance(self.lr, tuple) else (self.lr,) * len(self.ks)

    @property
    def seeds(self) -> tuple[int, ...]:
        """One init seed per model."""
        return self.init_seeds or (self.seed,) * len(self.ks)

    @property
    def max_ks(self) -> tuple[int, ...]:
        """Per-model static width of lax.top_k (the k schedule's start included)."""
        return tuple(max(k, self.k_start or 0) for k in self.ks)

    @property
    def max_k(self) -> int:
        """Static width of lax.top_k when all models share one program (vmap)."""
        return max(self.max_ks)

    def select(self, indices) -> "SweepConfig":
        """The config of a subset of the models (e.g. those that did not diverge)."""
        pick = lambda seq: tuple(seq[i] for i in indices)  # noqa: E731
        return dataclasses.replace(
            self, ks=pick(self.ks), lr=pick(self.lr) if isinstance(self.lr, tuple) else self.lr,
            init_seeds=pick(self.init_seeds) if self.init_seeds else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepConfig":
        d = dict(d)
        model = ModelConfig(**d.pop("model"))
        if "k_anneal_epochs" in d:  # files written before budgets in steps
            anneal = d.pop("k_anneal_epochs")
            d["k_anneal_frac"] = anneal / d["epochs"] if d.get("epochs") else 0.0
        tuples = ("ks", "init_seeds", "lr")
        return cls(model=model, **{k: tuple(v) if k in tuples and isinstance(v, list) else v
                                   for k, v in d.items()})


def sae_config(d_in: int, ks, *, latents: int | None = None, decoder: str = "auto",
               **overrides) -> SweepConfig:
    """A TopK SAE sweep with the recipe of Gao et al. 2024 as defaults: Adam eps 6.25e-10,
    lr 2e-4 / sqrt(latents / 2^14), AuxK with coefficient 1/32 over d_in / 2 dead latents,
    batch 4096, no L1."""
    model = ModelConfig("topk", hidden=latents, d_in=d_in, decoder=decoder)
    defaults = dict(lr=2e-4 / math.sqrt(model.hidden / 2 ** 14), eps=6.25e-10, aux_coef=1 / 32,
                    batch_size=4096, l1=0.0, seed=0)
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
