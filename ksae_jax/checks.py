"""Checks of settings, for the configs' __post_init__: each failure is one ValueError that
names the setting (the command line turns it into one line and exit code 2)."""
from __future__ import annotations

import functools
import math
import typing
from typing import Any

import numpy as np


def is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def positive_int(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not is_int(v) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def nonneg_int(name: str, v: Any) -> None:
    if not is_int(v) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {v!r}")


def positive(name: str, v: Any, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not (is_number(v) and 0 < v < math.inf):
        raise ValueError(f"{name} must be positive, got {v!r}")


def finite_nonneg(name: str, v: Any) -> None:
    if not (is_number(v) and 0 <= v < math.inf):
        raise ValueError(f"{name} must be >= 0, got {v!r}")


def fraction(name: str, v: Any, low_open: bool = False) -> None:
    """v in [0, 1] ((0, 1] with low_open)."""
    if not (is_number(v) and (0 < v if low_open else 0 <= v) and v <= 1):
        raise ValueError(f"{name} must lie in {'(0' if low_open else '[0'}, 1], got {v!r}")


def check_k(k: Any, latents: int, name: str = "k") -> int:
    """Validates one k for a code of `latents` units; returns it as a Python int."""
    if not is_int(k):
        raise ValueError(f"{name} must be an integer, got {k!r}")
    k = int(k)
    if k <= 0:
        raise ValueError(f"{name} must be positive, got {name}={k}")
    if k > latents:
        raise ValueError(f"{name}={k} is larger than the code's {latents} units")
    return k


@functools.cache
def choices(cls: type, name: str) -> tuple:
    """The values a field annotated Literal[...] (or Literal[...] | None) may take."""
    hint = typing.get_type_hints(cls)[name]
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    raise TypeError(f"{cls.__name__}.{name} is not annotated with Literal[...]")


def choice(config: Any, *names: str) -> None:
    """Each named field of a config holds one of its Literal's values (or None where allowed)."""
    for name in names:
        value, allowed = getattr(config, name), choices(type(config), name)
        if value not in allowed and value is not None:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
