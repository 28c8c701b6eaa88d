"""Where in a causal LM the SAEs read: hookpoints named by module path, as sparsify names them
(`transformer.h.3`, or a glob such as `transformer.h.*`, whose * stands for one part of
the path; or relative to the base model, as sparsify writes them: `h.3`: the module's output), or by the short
names people use: `resid_post.L` (block L's output), `mlp_in.L` and `mlp_out.L` (the input and
output of block L's MLP), and `mlp.L`, the pair a transcoder reads: the MLP's input beside its
output, (B, T, 2 d). `capture` runs the model once and returns every hookpoint's activations,
stopping after the last one it needs; `replace` splices a function into one hookpoint (at a
pair, the MLP's output becomes fn(pair))."""
from __future__ import annotations

import contextlib
import fnmatch
import re
from typing import NamedTuple

from ksae_jax.lm import model as lm_model
from ksae_jax.lm.jax_lm import output_half

SHORT = re.compile(r"^(resid_post|mlp_in|mlp_out|mlp)\.(\d+)$")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "mlp_block")


class Hookpoint(NamedTuple):
    """A resolved hookpoint: the name it was given as, the module and which side of it."""

    name: str
    path: str     # the module's path in model.named_modules()
    side: str     # "out": its output; "in": its (first) input; "pair": both; "jax": a JAX tap


def resolve(model, names) -> list[Hookpoint]:
    """The hookpoints the names stand for (globs expanded, in the model's order within a glob);
    LMError naming the available module paths for a name that matches nothing."""
    modules = dict(model.named_modules())
    found: list[Hookpoint] = []
    for name in names:
        if re.fullmatch(r"mlp\.\d+(\+\d+)+", name):
            raise lm_model.LMError(f"hookpoint {name}: several MLPs at once (a CLT's) are read "
                                   "by the LM in JAX (--lm-backend auto or jax; GPT-2 and the "
                                   "Llama family)")
        short = SHORT.match(name)
        if short:
            found.append(_short(model, modules, short.group(1), int(short.group(2)), name))
            continue
        paths = _matching(modules, name)
        base = getattr(model, "base_model_prefix", "")
        if not paths and base:  # sparsify's names, relative to the base model (h.3)
            paths = _matching(modules, f"{base}.{name}")
        if not paths:
            raise lm_model.LMError(f"hookpoint {name!r} matches no module of the model; "
                                   f"available: {_available(model)}")
        found += [Hookpoint(p if "*" in name or "?" in name else name, p, "out") for p in paths]
    check_unique(found)
    return found


def check_unique(found: list[Hookpoint]) -> None:
    """LMError when two hookpoints read the same activations (or one name comes twice)."""
    seen: dict = {}
    for h in found:
        other = seen.setdefault((h.path, h.side), h.name)
        if other != h.name or [x.name for x in found].count(h.name) > 1:
            raise lm_model.LMError(f"hookpoints repeat: {other} and {h.name} read the same "
                                   "activations")


def _matching(modules: dict, pattern: str) -> list[str]:
    """Module paths that the pattern names; a * stands for one part of the path."""
    return [p for p in modules if p and p.count(".") == pattern.count(".")
            and fnmatch.fnmatchcase(p, pattern)]


def _short(model, modules: dict, kind: str, layer: int, name: str) -> Hookpoint:
    lm_model.check_layer(model, layer)
    block = _path_of(modules, lm_model.blocks(model)[layer])
    if kind == "resid_post":
        return Hookpoint(name, block, "out")
    mlp = next((f"{block}.{m}" for m in MLP_NAMES if f"{block}.{m}" in modules), None)
    if mlp is None:
        raise lm_model.LMError(f"{name}: block {block} has no MLP module named one of {MLP_NAMES}")
    return Hookpoint(name, mlp, {"mlp_in": "in", "mlp_out": "out", "mlp": "pair"}[kind])


def is_pair(hookpoint: Hookpoint) -> bool:
    """Whether the hookpoint reads an MLP's input beside its output (mlp.L)."""
    return hookpoint.side == "pair" or bool(re.fullmatch(r"mlp\.\d+", hookpoint.path))


def is_several(hookpoint: Hookpoint) -> bool:
    """Whether the hookpoint reads several MLPs' pairs at once (a CLT's, mlp.0+1+2)."""
    return bool(re.fullmatch(r"mlp\.\d+(\+\d+)+", hookpoint.path))


def written(hookpoint: Hookpoint, value):
    """The part of a hookpoint's activations a replacement writes: a pair's output half."""
    return output_half(value) if is_pair(hookpoint) else value


def _path_of(modules: dict, module) -> str:
    return next(p for p, m in modules.items() if m is module)


def _available(model) -> str:
    """The block paths and the MLPs' (what one usually hooks), and the short names."""
    modules = dict(model.named_modules())
    blocks = [_path_of(modules, b) for b in lm_model.blocks(model)]
    inner = [p for p in modules if any(p == f"{b}.{m}" for b in blocks[:1] for m in MLP_NAMES)]
    n = len(blocks)
    return (f"{', '.join(blocks)}, {', '.join(inner)} (and the other modules below them); "
            f"resid_post.L, mlp_in.L, mlp_out.L, mlp.L for L in 0..{n - 1}")


def _first(value):
    return value[0] if isinstance(value, tuple) else value


class _Done(Exception):
    """Raised once every hookpoint has been read: the later modules are not run."""


def capture(model, hookpoints: list[Hookpoint], ids) -> dict:
    """{hookpoint name: (B, T, d) tensor} of one forward pass over token ids (torch, B x T);
    the forward stops as soon as the last of them has been read."""
    import torch

    got: dict = {}
    modules = dict(model.named_modules())

    def keep(name, side):
        def hook(module, args, output=None):
            value = args[0] if output is None else _first(output)
            if side == "pair":
                value = torch.cat([_first(args[0]), value], dim=-1)
            got[name] = _first(value).detach()
            if len(got) == len(hookpoints):
                raise _Done
        return hook

    handles = [modules[h.path].register_forward_pre_hook(keep(h.name, h.side)) if h.side == "in"
               else modules[h.path].register_forward_hook(keep(h.name, h.side))
               for h in hookpoints]
    try:
        with torch.no_grad():
            model(ids)
    except _Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return got


@contextlib.contextmanager
def replace(model, hookpoint: Hookpoint, fn):
    """While active, the hookpoint's activations h (B, T, d) become fn(h)."""
    module = dict(model.named_modules())[hookpoint.path]

    def pre(module, args):
        return (fn(args[0]),) + tuple(args[1:])

    def post(module, args, output):
        value = _first(output)
        if hookpoint.side == "pair":
            import torch
            value = torch.cat([_first(args[0]), value], dim=-1)
        if isinstance(output, tuple):
            return (fn(value),) + tuple(output[1:])
        return fn(value)

    handle = (module.register_forward_pre_hook(pre) if hookpoint.side == "in"
              else module.register_forward_hook(post))
    try:
        yield
    finally:
        handle.remove()


def for_layer(model, layer: int) -> Hookpoint:
    """Block `layer`'s output (what the caches hold)."""
    return resolve(model, [f"resid_post.{layer}"])[0]
