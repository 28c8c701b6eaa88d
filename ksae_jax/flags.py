"""The command line, generated from the frozen config dataclasses: every field is a flag of the
same name (`latents` -> `--latents`), typed by its annotation, documented by the docstring
under it, defaulting to the dataclass's default (or the command's preset). A flag left off the
command line is left out of what `parse` returns, so that the config's own default applies:
no default is written twice, and a setting travels under one name from the flag to the module.

A group of several config classes (the families' model configs, chosen by --arch) offers the
union of their fields; `build` refuses a field the chosen class does not have.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, NamedTuple


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one line and exit code 2 (UsageError)."""

    def error(self, message):
        raise UsageError(message)


class Group(NamedTuple):
    """Flags from one concern: the fields of `classes` but those in `skip`; with several
    classes, `key` names the field whose value picks one (listed first)."""

    title: str
    classes: tuple[type, ...]
    skip: frozenset = frozenset()
    key: str | None = None


@functools.cache
def docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass and of its bases, whitespace collapsed."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):  # no source (a class made at run time): no help text
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)):
                out[node.target.id] = re.sub(r"\s+", " ", after.value.value).strip()
    return out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kinds(hint) -> tuple[list, tuple | None, type | None]:
    """(the plain types a hint allows besides None, its Literal choices, a tuple's element)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    plain, choices, element = [], None, None
    for a in args:
        if a is type(None):
            continue
        if typing.get_origin(a) is typing.Literal:
            choices = (choices or ()) + typing.get_args(a)
        elif typing.get_origin(a) is tuple:
            element = typing.get_args(a)[0]
        else:
            plain.append(a)
    return plain, choices, element


def _converter(plain: list, choices: tuple | None, name: str):
    """str -> value: a number, a path, or one of the literal words the field takes."""
    def convert(text: str):
        if choices and text in choices:
            return text
        for t in plain:
            try:
                return t(text)
            except ValueError:
                continue
        words = f"one of {', '.join(map(str, choices))}" if choices else ""
        kind = " or ".join(t.__name__ for t in plain)
        raise argparse.ArgumentTypeError(
            f"expected {' or '.join(filter(None, (kind, words)))}, got {text!r}")
    convert.__name__ = name
    return convert


def _default_text(defaults: dict[str, Any]) -> str:
    """" (default X)": the classes' most common default, then the others by class; nothing
    where it is None (the docstring says what None means)."""
    def show(v):
        if isinstance(v, tuple):
            return " ".join(map(str, v)) or "none"
        return f"{v:g}" if isinstance(v, float) else str(v)

    groups: dict[str, tuple[Any, list]] = {}
    for name, v in defaults.items():
        groups.setdefault(repr(v), (v, []))[1].append(name)
    common = max(groups, key=lambda r: len(groups[r][1]))
    parts = [] if groups[common][0] is None else [show(groups[common][0])]
    parts += [f"{', '.join(names)}: {show(v)}" for r, (v, names) in groups.items()
              if r != common and v is not None]
    return f" (default {'; '.join(parts)})" if parts else ""


def add_group(parser: argparse.ArgumentParser, group: Group, preset: dict,
              shown: dict | None = None) -> None:
    """One argument group: a flag per field of the group's classes (merged by name); shown:
    defaults to print for fields whose config default is None (the model's, say)."""
    g = parser.add_argument_group(group.title)
    seen: dict[str, dict] = {}
    for cls in group.classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in group.skip or dataclasses.is_dataclass(hints[f.name]):
                continue
            entry = seen.setdefault(f.name, {"hint": hints[f.name], "defaults": {}, "kw": f.kw_only,
                                             "doc": docs(cls).get(f.name, ""),
                                             "positional": f.name in getattr(cls, "positional", ())})
            default = f.default if f.default is not dataclasses.MISSING else None
            entry["required"] = f.default is dataclasses.MISSING and f.name not in preset
            entry["defaults"][_class_name(cls, group.key, f.name)] = preset.get(
                f.name, (shown or {}).get(f.name, default))
            _, choices, _ = _kinds(hints[f.name])
            if choices:
                entry["choices"] = tuple(dict.fromkeys(entry.get("choices", ()) + choices))
    first = [n for n in seen if n == group.key]
    first += [n for n in seen if n not in first and not seen[n]["kw"]]
    for name in first + [n for n in seen if n not in first]:
        _add_flag(g, name, seen[name])


def _class_name(cls: type, key: str | None, field: str) -> str:
    """How help names a class where defaults differ: its key's default, else its name."""
    f = {x.name: x for x in dataclasses.fields(cls)}.get(key)
    return cls.__name__ if f is None or field == key else str(f.default)


def _add_flag(g, name: str, e: dict) -> None:
    plain, choices, element = _kinds(e["hint"])
    choices = e.get("choices", choices)
    help_text = e["doc"] + _default_text(e["defaults"])
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if e["positional"]:
        g.add_argument(name, type=_converter([element] if element else plain or [str], choices,
                                             name), help=e["doc"], metavar=name.upper(),
                       **({"nargs": "+"} if element else {}))
        return
    if e["required"]:
        kw["required"] = True
    if plain == [bool]:
        on = any(v for v in e["defaults"].values())
        g.add_argument(flag(f"no_{name}") if on else flag(name),
                       action="store_false" if on else "store_true", **{**kw, "help": e["doc"]})
        return
    if element is not None:
        kw.update(nargs="*", type=_converter([element], None, name))
        if plain:  # one value or one per model (e.g. lr)
            kw["action"] = _OneOrMany
    elif choices and not plain:
        kw.update(choices=choices)
    else:
        kw.update(type=_converter(plain or [str], choices, name), metavar=name.upper())
    g.add_argument(flag(name), **kw)


class _OneOrMany(argparse.Action):
    """nargs="*" for a field that takes one value or a tuple: one value stays one value."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else tuple(values))


def make_parser(prog: str, description: str, groups: list[Group], preset: dict | None = None,
                parser: argparse.ArgumentParser | None = None,
                shown: dict | None = None) -> argparse.ArgumentParser:
    """A parser with a group of flags per Group (preset: defaults this command changes;
    shown: defaults it only prints, where the config's is None)."""
    p = parser or Parser(prog=prog, description=description)
    for group in groups:
        add_group(p, group, preset or {}, shown)
    return p


def parse(parser: argparse.ArgumentParser, argv) -> dict:
    """{field: value} of the flags given on the command line (nothing else)."""
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if not k.startswith("_")}


def build(cls: type, values: dict, **fixed):
    """An instance of the dataclass cls from the flat values: each of its fields that values
    name, nested dataclasses built the same way, `fixed` as given; the rest its defaults."""
    hints = typing.get_type_hints(cls)
    kw = dict(fixed)
    for f in dataclasses.fields(cls):
        if f.name in kw or not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = build(hints[f.name], values)
        elif f.name in values:
            kw[f.name] = values[f.name]
    try:
        return cls(**kw)
    except (ValueError, TypeError) as e:
        names = {f.name for f in dataclasses.fields(cls)}  # a setting named as its flag
        raise UsageError(re.sub(r"^(\w+)(?=[ :=])", lambda m: flag(m.group(1))
                                if m.group(1) in names else m.group(1), str(e))) from None


def build_choice(classes: dict[str, type], key: str, values: dict, default: str, **fixed):
    """The instance of the class that values[key] names (default: `default`), refusing flags
    that only the other classes have."""
    chosen = values.get(key, default)
    cls = classes[chosen]
    own = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        others = [k for k, c in classes.items() if name in {f.name for f in dataclasses.fields(c)}]
        if others and name not in own:
            raise UsageError(f"{flag(name)}: a setting of {', '.join(others)} models, not "
                             f"{chosen}")
    return build(cls, {**values, key: chosen}, **fixed)
