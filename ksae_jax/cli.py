"""`ksae`, the installed command line (also `python -m ksae_jax`): one subcommand per step of
the SAE workflow. Every flag is generated from a config dataclass (ksae_jax.flags), so
`ksae COMMAND --help` lists every setting with its docstring. Exit codes: 0, 2 with one line
for a mistake of the user, 1 with one line for a run that failed, 130 when interrupted.

    ksae train --data acts.npy --latents 8192 --ks 8 16 32 64 --steps 2000
    ksae plan --d-in 4096 --latents 1048576 --ks 64 --mesh latent=8
    ksae lm --out runs/lm                                    # the offline GPT-2
    ksae cache --model runs/lm --layer 2 --tokens 2097152 --out runs/acts_lm
    ksae evaluate --sae runs/sae/params.pkl --model runs/lm --layer 2
    ksae browse runs/sae
    ksae export runs/sae/params.pkl --format saelens --model 32
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import NamedTuple

from ksae_jax import flags

USAGE_ERROR = 2


class Command(NamedTuple):
    summary: str
    target: str  # "module:function", called as function(argv, prog), imported when it runs

    def main(self, argv, prog):
        module, function = self.target.split(":")
        return getattr(importlib.import_module(module), function)(argv, prog=prog)


def plan(argv, prog="ksae plan"):
    from ksae_jax import plan as compiler_plan
    from ksae_jax import runner, sae_run, sharding
    from ksae_jax.config import Execution, Optimizer, SweepConfig
    from ksae_jax.models import registry

    groups = [flags.Group("model (the family: --arch)", sae_run.model_configs(),
                          key="arch"),
              flags.Group("sweep and budget", (SweepConfig,)),
              flags.Group("optimizer and schedules", (Optimizer,)),
              flags.Group("execution", (Execution,)),
              flags.Group("output", (runner.Output,), frozenset({"overwrite", "progress"})),
              flags.Group("devices", (runner.Devices,), runner.MULTI_HOST),
              flags.Group("a JAX language model feeding the SAEs", (compiler_plan.LMPlan,))]
    values = {"arch": registry.DEFAULT_SAE, **flags.parse(flags.make_parser(
        prog, "The compiler's plan of one training step on a device mesh, from abstract shapes "
        "(nothing is allocated): memory, FLOPs and collectives per device.", groups), argv)}
    if "mesh" not in values:
        raise flags.UsageError("give --mesh (the devices the plan is for)")
    model = flags.build_choice(sae_run.model_classes(), "arch", values, registry.DEFAULT_SAE)
    cfg = flags.build(SweepConfig, values, model=model)
    try:
        mesh = sharding.parse_mesh(values["mesh"])
    except ValueError as e:
        raise flags.UsageError(f"--mesh: {e}") from None
    try:
        return compiler_plan.run(cfg, mesh, values.get("out"),
                                 flags.build(compiler_plan.LMPlan, values))
    except ValueError as e:  # the mesh against the sweep, or the LM's config (LMError)
        raise flags.UsageError(str(e)) from None


def lm_train(argv, prog="ksae lm"):
    from ksae_jax import runner
    from ksae_jax.lm import offline_lm

    values = _lm_values(argv, prog, "Train the offline GPT-2 (BPE and model from a config) on "
                        "English text, saved as a Hugging Face folder.", offline_lm.LMConfig)
    cfg = flags.build(offline_lm.LMConfig, values)
    docs = _lm_call(lambda: offline_lm.text.documents(cfg.text))  # refused before writing
    out = runner.prepare_out_dir(values.get("out", "runs/lm"), values.get("overwrite", False))
    return _lm_call(lambda: offline_lm.run(cfg, out, docs, values.get("progress", True)))


def cache(argv, prog="ksae cache"):
    from ksae_jax.lm import cache as lm_cache

    values = _lm_values(argv, prog, "Cache a causal LM's residual stream after block L as .npy "
                        "shards (DIR/train, DIR/heldout, DIR/meta.json).", lm_cache.CacheConfig,
                        out_required=True)
    cfg = flags.build(lm_cache.CacheConfig, values)
    return _lm_call(lambda: lm_cache.run(cfg, values["out"], values.get("overwrite", False),
                                         values.get("progress", True)))


def evaluate(argv, prog="ksae evaluate"):
    from ksae_jax.lm import splice

    values = flags.parse(flags.make_parser(prog, "A saved SAE's LM loss with its reconstruction "
                                           "spliced in (every model it holds).", [flags.Group(
                                               "evaluation", (splice.EvaluateConfig,))]), argv)
    return _lm_call(lambda: splice.evaluate(flags.build(splice.EvaluateConfig, values)))


def browse(argv, prog="ksae browse"):
    from ksae_jax import browse as pages

    values = flags.parse(flags.make_parser(prog, "Static HTML pages of a run's features.",
                                           [flags.Group("pages", (pages.BrowseConfig,))]), argv)
    return pages.write(flags.build(pages.BrowseConfig, values))


def export(argv, prog="ksae export"):
    from ksae_jax import export as exports

    values = flags.parse(flags.make_parser(prog, "Write a trained sweep in the ecosystem's "
                                           "formats.", [flags.Group(
                                               "export", (exports.ExportConfig,))]), argv)
    try:
        return exports.export(flags.build(exports.ExportConfig, values))
    except ValueError as e:
        raise flags.UsageError(str(e)) from None


def _lm_values(argv, prog, description, config, out_required=False) -> dict:
    from ksae_jax import runner

    groups = [flags.Group("settings", (config,)), flags.Group("output", (runner.Output,))]
    values = flags.parse(flags.make_parser(prog, description, groups), argv)
    if out_required and "out" not in values:
        raise flags.UsageError("the following arguments are required: --out")
    return values


def _lm_call(fn):
    """fn() with the LM extra required and its errors as one line (exit code 2)."""
    from ksae_jax import lm

    try:
        lm.require()
        from ksae_jax.lm.cache import CacheError
        from ksae_jax.lm.model import LMError
        from ksae_jax.lm.text import TextError
    except lm.LMUnavailable as e:
        raise flags.UsageError(str(e)) from None
    try:
        return fn()
    except (CacheError, LMError, TextError, ValueError) as e:
        raise flags.UsageError(str(e)) from None


COMMANDS = {
    "train": Command("train SAEs of any family on vectors, every model of a sweep in one "
                     "compiled run", "ksae_jax.sae_run:main"),
    "plan": Command("compile one training step on a device mesh from abstract shapes: memory, "
                    "FLOPs and collectives per device", "ksae_jax.cli:plan"),
    "lm": Command("train the offline GPT-2 on English text (needs requirements-lm.txt)",
                  "ksae_jax.cli:lm_train"),
    "cache": Command("cache a language model's residual stream as .npy shards", "ksae_jax.cli:cache"),
    "evaluate": Command("a saved SAE's LM loss with its reconstruction spliced in",
                        "ksae_jax.cli:evaluate"),
    "browse": Command("static HTML pages of a run's features", "ksae_jax.cli:browse"),
    "export": Command("write a trained sweep as safetensors, or one SAE for SAELens or "
                      "sparsify", "ksae_jax.cli:export"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return ("usage: ksae COMMAND [FLAGS]   (ksae COMMAND --help lists every flag)\n\n"
            + "\n".join(f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items()) + "\n")


def main(argv: list[str] | None = None) -> None:
    """The `ksae` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage() + "\n" + __doc__.split("\n\n")[1].rstrip())
        sys.exit(0 if argv else USAGE_ERROR)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"ksae: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    run(lambda: COMMANDS[name].main(rest, f"ksae {name}"), f"ksae {name}")


def run(fn: Callable[[], object], prog: str) -> None:
    """Runs a command and exits: 0 (or the int it returns), 2 with one line on stderr for a
    user's mistake, 1 for a run that failed, 130 when interrupted."""
    from ksae_jax.data.images import DataError
    from ksae_jax.runner import RunFailed
    from ksae_jax.safe_pickle import ParamsFileError

    try:
        code = fn()
    except (flags.UsageError, ParamsFileError, DataError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except RunFailed as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
