"""Named training recipes of the image autoencoders: the values a run takes where the user
gave none (a flag given on the command line always wins).

"paper" is Makhzani & Frey's released k-sparse autoencoder code (the `K-Sparse Autoencoder`
notebook and `python_lib/` of the makhzani convnet code): tied 784-1000-784, relu units then
the top-k mask (at test time too), linear output, loss 0.5 * the sum over the 784 pixels of
the squared error averaged over the batch, plain SGD with momentum 0.9 at lr 0.01 and batch
128 with no schedule, no weight decay, every parameter (biases too) drawn from 0.01 * N(0, 1),
pixels / 255 uncentred. k is fixed from the first step (the code schedules nothing; the
paper's text lowers k from 100 over the first half, which --k-start and --k-anneal-frac give
back).
"""
from __future__ import annotations

import dataclasses
from typing import Literal

PAPER = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01, "batch_size": 128,
         "loss": "half_sse", "init_std": 0.01, "activation": "relu", "tied": True, "l1": 0.0}


@dataclasses.dataclass(frozen=True)
class ImageRecipe:
    """A named set of training choices; any flag given beside it overrides its value."""

    recipe: Literal["default", "paper"] = "default"
    """default: Adam, mean-per-pixel MSE, PyTorch's init; paper: Makhzani & Frey's code (SGD
    momentum 0.9, lr 0.01, batch 128, 0.5 * summed squared error, 0.01 * N(0, 1) init, relu
    units, tied, fixed k)."""

    def values(self, defaults: dict) -> dict:
        """The values this recipe gives: the paper's, or the command's `defaults`."""
        return dict(PAPER) if self.recipe == "paper" else dict(defaults)


def record(recipe: str, cfg) -> dict:
    """The recipe a run used, for its results: the name and every value it sets."""
    model, optim = cfg.model, cfg.optim
    out = {"recipe": recipe, "optimizer": optim.optimizer, "momentum": optim.momentum,
           "lr": optim.lr, "batch_size": cfg.batch_size, "loss": model.loss,
           "init_std": model.init_std, "activation": model.activation, "tied": model.tied,
           "l1": model.l1}
    if out["optimizer"] != "sgd":
        out.pop("momentum")
    return out
