"""Frozen dataclasses that describe a training run, one per concern: the sweep and its budget
(`SweepConfig`, which holds the others), the optimizer and its schedules (`Optimizer`), and
how the models share the compiled program (`Execution`). The model's config, with its
family's recipe (AuxK, initialisation, resampling), is the family's own (ksae_jax.models).
Saved beside every result; files of earlier layouts are read by ksae_jax.formats."""
from __future__ import annotations

import dataclasses
from typing import Literal

from ksae_jax import checks
from ksae_jax.models import ModelConfig, registry
from ksae_jax.models.batchtopk import BatchTopKModel
from ksae_jax.models.images import ImageModel
from ksae_jax.models.jumprelu import JumpReLUModel
from ksae_jax.models.matryoshka import MatryoshkaModel
from ksae_jax.models.topk import TopKModel
from ksae_jax.models.vector import SaeModel

__all__ = ["BatchTopKModel", "Execution", "ImageModel", "JumpReLUModel", "MatryoshkaModel",
           "Optimizer", "SaeModel", "SweepConfig", "TopKModel", "sae_config"]

DEFAULT_EPOCHS = 9  # the original's budget, when neither steps nor epochs is given


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """How every model's parameters move: the optimizer, its learning-rate schedule and the
    k schedule."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """"adam" (PyTorch's), or "sgd" (with momentum: v = momentum v + g, step -lr v)."""
    lr: float | tuple[float, ...] | None = None
    """Learning rate: one for all models, or one per model; None: the model's (images 1e-3,
    the original's; SAEs 2e-4 / sqrt(latents / 2^14), Gao et al.'s)."""
    momentum: float = 0.9
    """SGD's momentum (Adam has none)."""
    adam_eps: float | None = None
    """Adam epsilon; None: the model's (PyTorch's for images, Gao et al.'s for SAEs)."""
    warmup_steps: int = 0
    """Linear learning-rate warmup over the first steps."""
    lr_decay_frac: float = 0.0
    """Linear learning-rate decay to 0 over this last fraction of the budget (0: none)."""
    clip_norm: float | None = None
    """Clip each model's gradient to this global norm."""
    k_start: int | None = None
    """k schedule (Makhzani & Frey): each model starts at k_start and moves linearly to its
    own k over the first k_anneal_frac of the budget (None: k fixed)."""
    k_anneal_frac: float = 0.25
    """The fraction of the budget over which k falls from k_start."""

    def __post_init__(self):
        checks.choice(self, "optimizer")
        if isinstance(self.lr, (tuple, list)):
            object.__setattr__(self, "lr", tuple(float(v) for v in self.lr))
        for v in self.lr if isinstance(self.lr, tuple) else (self.lr,):
            checks.positive("lr", v, allow_none=True)
        if not (checks.is_number(self.momentum) and 0 <= self.momentum < 1):
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.momentum != 0.9 and self.optimizer != "sgd":
            raise ValueError("momentum applies to optimizer 'sgd'")
        checks.positive("adam_eps", self.adam_eps, allow_none=True)
        checks.nonneg_int("warmup_steps", self.warmup_steps)
        checks.fraction("lr_decay_frac", self.lr_decay_frac)
        checks.positive("clip_norm", self.clip_norm, allow_none=True)
        checks.positive_int("k_start", self.k_start, allow_none=True)
        checks.fraction("k_anneal_frac", self.k_anneal_frac)
        if self.k_start is not None and self.k_anneal_frac == 0:
            raise ValueError("k_start schedules k over k_anneal_frac of the budget: give "
                             "k_anneal_frac > 0")


@dataclasses.dataclass(frozen=True)
class Execution:
    """How the models of a sweep share the compiled program, and how often the run stops to
    evaluate and checkpoint."""

    batching: Literal["auto", "loop", "vmap"] = "auto"
    """"vmap", "loop" (one after another inside the step, each with its own static top-k
    width) or "auto" (loop on CPU, vmap on accelerators and when the mesh splits the models)."""
    eval_every: int | None = None
    """Steps between evaluations and checkpoints (None: every epoch, or 10 per run when that
    is more than 20 epochs or less than one)."""

    def __post_init__(self):
        checks.choice(self, "batching")
        checks.positive_int("eval_every", self.eval_every, allow_none=True)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One training run, whatever the model family: every model of the sweep (one per k, or
    per L0 coefficient) trained side by side in one compiled program, for a budget of steps
    or epochs (one of the two; neither: the original's 9 epochs)."""

    model: ModelConfig = ImageModel()
    """The model's config (its family's: ImageModel, TopKModel, ...)."""
    ks: tuple[int, ...] | None = None
    """One model per k, all in one compiled run (None: the model's default sweep)."""
    l0_coefs: tuple[float, ...] | None = None
    """JumpReLU: one model per coefficient of its L0 penalty, all in one compiled run (None:
    its default sweep)."""
    epochs: int | None = None
    """Passes over the training data (exclusive with steps)."""
    steps: int | None = None
    """Optimizer steps (exclusive with epochs)."""
    batch_size: int | None = None
    """Rows per step (None: the model's: the original's for images, Gao et al.'s for SAEs)."""
    seed: int | None = None
    """Data order, and every model's init unless init_seeds is given (None: the model's)."""
    init_seeds: tuple[int, ...] | None = None
    """Per-model init seeds (default: every model starts from seed, as the original's runs)."""
    optim: Optimizer = Optimizer()
    """The optimizer and its schedules."""
    execution: Execution = Execution()
    """How the models share the compiled program; evaluation cadence."""
    hookpoints: tuple[str, ...] = ()
    """One sweep per hookpoint of a language model, all in one compiled run: the models are
    every (hookpoint, label) pair, hookpoint-major, each fed its own hookpoint's rows (empty:
    one sweep on one set of vectors)."""

    def __post_init__(self):
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a model config (ImageModel, TopKModel, ...), got "
                             f"{self.model!r}"[:200])
        self._fill_defaults()
        self.model.check_labels(self.ks, self.l0_coefs)
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"{self.label_name}s has repeated values: {list(self.labels)}")
        object.__setattr__(self, "hookpoints", tuple(str(h) for h in self.hookpoints))
        if len(set(self.hookpoints)) != len(self.hookpoints):
            raise ValueError(f"hookpoints has repeated values: {list(self.hookpoints)}")
        self._check_budget()
        lrs = self.optim.lr
        if isinstance(lrs, tuple) and len(lrs) != len(self.labels):
            raise ValueError(f"lr needs one value per {self.label_name} ({len(self.labels)}), "
                             f"got {len(lrs)}")
        if self.optim.k_start is not None:
            if not self.ks:
                raise ValueError("k_start schedules k: this model has none")
            checks.check_k(self.optim.k_start, self.model.latents, name="k_start")

    def _fill_defaults(self):
        """The model's defaults for what was left None; values as ints, floats and tuples."""
        model, defaults = self.model, self.model.training_defaults
        sweep = {"ks": (), "l0_coefs": ()} | {model.sweeps_over: model.default_sweep}
        for name, cast in (("ks", lambda k: int(k) if checks.is_int(k) else k),
                           ("l0_coefs", lambda c: float(c) if checks.is_number(c) else c)):
            value = sweep[name] if getattr(self, name) is None else getattr(self, name)
            object.__setattr__(self, name, tuple(cast(v) for v in value))
        for name in ("batch_size", "seed"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
        optim = self.optim
        if optim.lr is None or optim.adam_eps is None:
            optim = dataclasses.replace(
                optim, lr=model.default_lr() if optim.lr is None else optim.lr,
                adam_eps=defaults["adam_eps"] if optim.adam_eps is None else optim.adam_eps)
            object.__setattr__(self, "optim", optim)

    def _check_budget(self):
        if self.epochs is not None and self.steps is not None:
            raise ValueError("give steps or epochs, not both")
        if self.epochs is None and self.steps is None:
            object.__setattr__(self, "epochs", DEFAULT_EPOCHS)
        for name in ("epochs", "steps", "batch_size"):
            checks.positive_int(name, getattr(self, name), allow_none=True)
        if not checks.is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.init_seeds is not None:
            object.__setattr__(self, "init_seeds", tuple(int(s) for s in self.init_seeds))
            if len(self.init_seeds) != len(self.labels):
                raise ValueError(f"init_seeds needs one seed per {self.label_name} "
                                 f"({len(self.labels)}), got {len(self.init_seeds)}")

    @property
    def family(self):
        """The model's Family (its maths)."""
        return registry.family(self.model)

    @property
    def labels(self) -> tuple:
        """What names each model: its k, or its L0 coefficient (JumpReLU)."""
        return self.ks or self.l0_coefs

    @property
    def label_name(self) -> str:
        return self.model.label_name

    @property
    def n_sources(self) -> int:
        """The sets of rows the models read: one per hookpoint, or the one data set."""
        return max(1, len(self.hookpoints))

    @property
    def n_models(self) -> int:
        return len(self.labels) * self.n_sources

    def per_model(self, values) -> tuple:
        """A per-label sequence repeated for every hookpoint (one entry per model)."""
        return tuple(values) * self.n_sources

    @property
    def sources(self) -> tuple[int, ...]:
        """Per model, which set of rows (hookpoint) it reads."""
        return tuple(h for h in range(self.n_sources) for _ in self.labels)

    @property
    def model_names(self) -> tuple[str, ...]:
        """What names each model in messages: its label, or hookpoint/label."""
        if not self.hookpoints:
            return tuple(str(label) for label in self.labels)
        return tuple(f"{h}/{label}" for h in self.hookpoints for label in self.labels)

    @property
    def lrs(self) -> tuple[float, ...]:
        """One learning rate per model."""
        lr = self.optim.lr
        return self.per_model(lr if isinstance(lr, tuple) else (lr,) * len(self.labels))

    @property
    def seeds(self) -> tuple[int, ...]:
        """One init seed per model."""
        return self.per_model(self.init_seeds or (self.seed,) * len(self.labels))

    @property
    def max_ks(self) -> tuple[int | None, ...]:
        """Per-model static width of the top-k (the k schedule's start included; None for
        models without a k)."""
        return self.per_model(tuple(max(k, self.optim.k_start or 0) for k in self.ks)
                              or (None,) * len(self.labels))

    @property
    def one_sweep(self) -> SweepConfig:
        """The sweep of one hookpoint alone (what each hookpoint's folder holds)."""
        return dataclasses.replace(self, hookpoints=())

    @property
    def max_k(self) -> int | None:
        """Static width of the top-k when all models share one program (vmap)."""
        return max(self.max_ks) if self.ks else None

    def select(self, indices) -> SweepConfig:
        """The config of a subset of the models of one sweep (e.g. those that did not
        diverge)."""
        if self.hookpoints:
            raise ValueError("select among the models of one hookpoint's sweep (cfg.one_sweep)")
        pick = lambda seq: tuple(seq[i] for i in indices) if seq else seq
        lr = self.optim.lr
        return dataclasses.replace(
            self, ks=pick(self.ks), l0_coefs=pick(self.l0_coefs),
            optim=dataclasses.replace(self.optim, lr=pick(lr) if isinstance(lr, tuple) else lr),
            init_seeds=pick(self.init_seeds) if self.init_seeds else None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sae_config(d_in: int, ks=None, *, latents: int | None = None,
               arch: str = registry.DEFAULT_SAE, **fields) -> SweepConfig:
    """An SAE sweep of the family `arch` (TopK by default) on d_in-wide vectors with the
    recipe of Gao et al. 2024 as defaults (the model's). `fields` may name any field of the
    family's model config, of SweepConfig, of Optimizer or of Execution."""
    model_cls = registry.lookup(arch).config
    parts = {"model": {}, "optim": {}, "execution": {}, "sweep": {}}
    for name, value in fields.items():
        part = next((p for p, cls in (("model", model_cls), ("optim", Optimizer),
                                      ("execution", Execution), ("sweep", SweepConfig))
                     if name in {f.name for f in dataclasses.fields(cls)}), None)
        if part is None:
            raise TypeError(f"sae_config: {name!r} is not a setting of {arch} SAEs or of "
                            "their training")
        parts[part][name] = value
    model = model_cls(d_in=d_in, latents=latents, arch=arch, **parts["model"])
    return SweepConfig(model=model, ks=None if ks is None else tuple(ks),
                       optim=Optimizer(**parts["optim"]), execution=Execution(**parts["execution"]),
                       **parts["sweep"])
