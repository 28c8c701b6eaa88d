"""Optional experiment tracking, as sparsify, SAELens and dictionary_learning offer it: every
evaluation point's per-model metrics (train loss and FVU, held-out FVU and L0, dead latents
over the window) to Weights & Biases and/or TensorBoard. Off by default; neither package is a
dependency of ksae_jax (`pip install wandb` / `pip install tensorboardX`); W&B runs without
network with WANDB_MODE=offline (its files then go under OUT/wandb)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ksae_jax.flags import UsageError

LOGGED = {"train_loss": "train/loss", "train_rec": "train/fvu", "eval_fvu": "eval/fvu",
          "eval_l0": "eval/l0", "window_dead_frac": "train/dead_frac_window"}


@dataclasses.dataclass(frozen=True)
class Tracking:
    """Where the run's metrics are logged at every evaluation point, besides metrics.json."""

    wandb: bool = False
    """Log to Weights & Biases (pip install wandb; WANDB_MODE=offline: no network needed)."""
    wandb_project: str = "ksae_jax"
    """The W&B project."""
    tensorboard: bool = False
    """Write TensorBoard event files to OUT/tensorboard (pip install tensorboardX)."""

    def open(self, out: Path, config: dict) -> Tracker | None:
        """The tracker of a run writing to `out` (None when nothing is tracked); a missing
        package is a UsageError naming what to install."""
        if not (self.wandb or self.tensorboard):
            return None
        return Tracker(self, out, config)


class Tracker:
    """The open W&B run and TensorBoard writer of one training run."""

    def __init__(self, cfg: Tracking, out: Path, config: dict):
        self.run = self.writer = None
        if cfg.wandb:
            wandb = _needs("wandb", "--wandb")
            self.run = wandb.init(project=cfg.wandb_project, dir=str(out), config=config,
                                  name=out.name, reinit=True)
        if cfg.tensorboard:
            writer = _needs("tensorboardX", "--tensorboard").SummaryWriter
            self.writer = writer(str(out / "tensorboard"))

    def log(self, step: int, history: dict, names: list[str]) -> None:
        """The last evaluation point of `history`, one series per model (named by `names`)."""
        scalars = {}
        for field, tag in LOGGED.items():
            if history.get(field):
                for name, value in zip(names, history[field][-1]):
                    if value is not None:
                        scalars[f"{tag}/{name}"] = value
        if self.run is not None:
            self.run.log(scalars, step=step)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
        if self.writer is not None:
            self.writer.close()


def _needs(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{flag} needs {module}: pip install {module}") from None
