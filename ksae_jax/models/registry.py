"""The families, by arch: each family's file registers its model config, its Family and its
inference class once (`register`); everything else looks them up here from a model config or
an arch name, and never asks which kind a model is."""
from __future__ import annotations

import functools
from typing import NamedTuple


class Registered(NamedTuple):
    config: type   # the model config (a models.family.ModelConfig dataclass)
    family: type   # its models.family.Family
    loaded: type   # its inference class (a models.loaded.Loaded)


FAMILIES: dict[str, Registered] = {}
DEFAULT_SAE = "topk"  # the family an SAE sweep trains unless told otherwise


def register(arch: str, config: type, family: type, loaded: type) -> None:
    """Makes a family known by its arch name (its config's `arch` field)."""
    if arch in FAMILIES and FAMILIES[arch] != (config, family, loaded):
        raise ValueError(f"arch {arch!r} is registered already")
    FAMILIES[arch] = Registered(config, family, loaded)


def lookup(arch: str) -> Registered:
    if arch not in FAMILIES:
        raise ValueError(f"unknown arch {arch!r}; the families are {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def archs(kind: type | None = None) -> tuple[str, ...]:
    """Every registered arch, or those whose config is a subclass of `kind`."""
    return tuple(a for a, r in FAMILIES.items() if kind is None or issubclass(r.config, kind))


@functools.cache
def family(model):
    """The Family of a model config."""
    return lookup(model.arch).family(model)


def loaded(config, params: dict, metrics: dict | None = None, input_scale: float = 1.0):
    """Trained models for inference (the family's Loaded class) of a sweep's config."""
    return lookup(config.model.arch).loaded(config, params, metrics, input_scale)
