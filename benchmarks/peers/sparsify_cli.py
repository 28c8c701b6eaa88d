"""EleutherAI's sparsify command line (`python -m sparsify MODEL DATASET ...`) on a CPU, timed.

Its loader asks for the model on cuda:0 (`device_map={"": "cuda:0"}`); here the model is
loaded on the CPU and everything else is sparsify's own `run()`. Around it, two clocks: the
time inside the model's forward calls and the time inside the forward hooks sparsify trains
its coders in (their encode, decode, loss and backward run there), so that the LM's own share
is (forward - hooks) / fit. Prints, as its last line, JSON: fit_seconds, forward_seconds,
hook_seconds, lm_seconds, steps.

    python benchmarks/peers/sparsify_cli.py MODEL DATASET --layers 0 1 --k 32 ...
"""
from __future__ import annotations

import json
import sys
import time

import torch

CLOCK = {"forward": 0.0, "hooks": 0.0, "fit": 0.0, "steps": 0}


def timed_hooks() -> None:
    """Every forward hook registered from now on adds its time to CLOCK["hooks"]."""
    register = torch.nn.Module.register_forward_hook

    def wrapped(self, hook, *args, **kwargs):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return hook(*a, **k)
            finally:
                CLOCK["hooks"] += time.perf_counter() - t
        return register(self, timed, *args, **kwargs)

    torch.nn.Module.register_forward_hook = wrapped


def on_cpu() -> None:
    """sparsify's load_artifacts with the model on the CPU, its forward timed."""
    import sparsify.__main__ as cli

    load = cli.load_artifacts

    def load_on_cpu(args, rank):
        from_pretrained = cli.AutoModel.from_pretrained

        def cpu_model(*a, **k):
            k.pop("device_map", None)
            return from_pretrained(*a, **k)

        cli.AutoModel.from_pretrained = cpu_model
        try:
            model, dataset = load(args, rank)
        finally:
            cli.AutoModel.from_pretrained = from_pretrained
        forward = model.forward

        def timed_forward(*a, **k):
            t = time.perf_counter()
            try:
                return forward(*a, **k)
            finally:
                CLOCK["forward"] += time.perf_counter() - t
                CLOCK["steps"] += 1

        model.forward = timed_forward
        return model, dataset

    cli.load_artifacts = load_on_cpu


def timed_fit() -> None:
    from sparsify.trainer import Trainer

    fit = Trainer.fit

    def fit_timed(self):
        t = time.perf_counter()
        try:
            return fit(self)
        finally:
            CLOCK["fit"] = time.perf_counter() - t

    Trainer.fit = fit_timed


def main() -> None:
    import os

    torch.set_num_threads(os.cpu_count() or 1)
    timed_hooks()
    on_cpu()
    timed_fit()
    import sparsify.__main__ as cli

    sys.argv = ["sparsify", *sys.argv[1:]]
    cli.run()
    print(json.dumps({"fit_seconds": CLOCK["fit"], "forward_seconds": CLOCK["forward"],
                      "hook_seconds": CLOCK["hooks"],
                      "lm_seconds": CLOCK["forward"] - CLOCK["hooks"], "steps": CLOCK["steps"]}))


if __name__ == "__main__":
    main()
