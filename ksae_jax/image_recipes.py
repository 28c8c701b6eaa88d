"""Named training recipes of the image autoencoders: the values the experiments' flags take
where the user gave none (a flag given on the command line always wins).

"paper" is Makhzani & Frey's released k-sparse autoencoder code (the `K-Sparse Autoencoder`
notebook and `python_lib/` of the makhzani convnet code, as read for issue 22): tied
784-1000-784, relu units then the top-k mask (at test time too), linear output, loss 0.5 *
the sum over the 784 pixels of the squared error averaged over the batch, plain SGD with
momentum 0.9 at lr 0.01 and batch 128 with no schedule, no weight decay, every parameter
(biases too) drawn from 0.01 * N(0, 1), pixels / 255 uncentred. k is fixed from the first
step (the code schedules nothing; the paper's text lowers k from 100 over the first half,
which --k-start and --k-anneal-frac give back).
"""
from __future__ import annotations

import argparse

from ksae_jax import cli

NAMES = ("default", "paper")
PAPER = {"optimizer": "sgd", "momentum": 0.9, "lr": 0.01, "batch_size": 128,
         "loss": "half_sse", "init_std": 0.01, "activation": "relu", "tied": True, "l1": 0.0,
         "k_anneal_frac": 0.0}


def add_flags(p: argparse.ArgumentParser) -> None:
    """--recipe and the flags only a recipe sets otherwise (the experiments add --lr,
    --batch-size, --l1, --tied themselves, each with default None)."""
    g = p.add_argument_group("training recipe")
    g.add_argument("--recipe", choices=NAMES, default="default",
                   help="default: Adam, mean-per-pixel MSE, PyTorch's init; paper: Makhzani & "
                        "Frey's code (SGD momentum 0.9, lr 0.01, batch 128, 0.5 * summed "
                        "squared error, 0.01 * N(0, 1) init, relu units, tied, fixed k); "
                        "flags given here override the recipe's values")
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=None)
    g.add_argument("--momentum", type=cli.nonneg_float, default=None,
                   help="sgd's momentum (paper: 0.9)")
    g.add_argument("--loss", choices=("mse", "bce", "half_sse"), default=None,
                   help="mse: mean over pixels; half_sse: 0.5 * sum over pixels (paper)")
    g.add_argument("--init-std", type=cli.positive_float, default=None,
                   help="every parameter init_std * N(0, 1) (paper: 0.01; default PyTorch's)")
    g.add_argument("--activation", choices=("relu", "linear"), default=None,
                   help="the mlp's code units before the top-k (default linear; paper relu)")


def fill(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """args with every recipe value the user left unset (None) filled in: the paper's when
    --recipe paper, else the experiment's `defaults`."""
    momentum_given = args.momentum is not None
    values = PAPER if args.recipe == "paper" else defaults
    for name, value in values.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, value)
    if momentum_given and args.optimizer != "sgd":
        raise cli.UsageError("--momentum applies to --optimizer sgd")
    if args.momentum is None:
        args.momentum = 0.9  # SweepConfig's default; unused by Adam
    return args


def record(args: argparse.Namespace) -> dict:
    """The recipe a run used, for its results: the name and every value it set."""
    out = {"recipe": args.recipe}
    out.update({n: getattr(args, n) for n in PAPER if hasattr(args, n)})
    if out.get("optimizer") != "sgd":
        out.pop("momentum", None)
    return out
