"""Reading pickles without running their code: a pure-Python unpickler that resolves only the
numpy callables an array, a dtype or a scalar needs (each wrapped to refuse object dtypes
before numpy sees them), a structure check once per object (cycles, depth, and the size the
structure would expand to: shared-reference "billion laughs" bombs), and a SHA-256 digest of
a plain structure. Anything unexpected, whatever exception it raises, becomes
ParamsFileError naming the file."""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

MAX_DEPTH = 64               # containers nested deeper than this are refused
MAX_NODES = 1_000_000        # ... and structures that expand to more objects than this


class ParamsFileError(ValueError):
    """A params or checkpoint file is missing, truncated, corrupt, of another version, or unsafe."""


def _refuse_object_dtype(dt) -> np.dtype:
    if not isinstance(dt, np.dtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(dt).__name__}")
    if dt.hasobject:
        raise pickle.UnpicklingError(f"refused dtype {dt} (it holds Python objects)")
    return dt


_NDARRAY = object()  # what "numpy.ndarray" resolves to: usable only as _reconstruct's class


def _safe_dtype(*args):
    return _refuse_object_dtype(np.dtype(*args))


def _safe_reconstruct(cls, shape, dtype_code):
    """numpy's array pickles start from an empty array whose state BUILD sets."""
    if cls is not _NDARRAY or shape != (0,):
        raise pickle.UnpicklingError("_reconstruct of something other than an empty ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _refuse_object_dtype(np.dtype(dtype_code)))


def _safe_scalar(dtype, *data):
    from numpy._core.multiarray import scalar
    return scalar(_refuse_object_dtype(dtype), *data)


def _safe_frombuffer(buf, dtype, shape, order):
    from numpy._core.numeric import _frombuffer
    return _frombuffer(buf, _refuse_object_dtype(dtype), shape, order)


_ALLOWED = {"ndarray": _NDARRAY, "dtype": _safe_dtype, "_reconstruct": _safe_reconstruct,
            "scalar": _safe_scalar, "_frombuffer": _safe_frombuffer}
_NUMPY_MODULES = {"numpy": ("ndarray", "dtype"),
                  "numpy._core.multiarray": ("_reconstruct", "scalar"),
                  "numpy.core.multiarray": ("_reconstruct", "scalar"),
                  "numpy._core.numeric": ("_frombuffer",), "numpy.core.numeric": ("_frombuffer",)}


class _SafeUnpickler(pickle._Unpickler):  # the Python one: its BUILD can be checked
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str):
        if name in _NUMPY_MODULES.get(module, ()):
            return _ALLOWED[name]
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name}: only numpy arrays, dtypes and plain containers "
            "are allowed")

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if not isinstance(inst, (np.ndarray, np.dtype)):
            raise pickle.UnpicklingError(f"refused to set the state of a {type(inst).__name__}")
        if isinstance(inst, np.ndarray):
            if not isinstance(state, tuple) or not any(isinstance(s, np.dtype) for s in state):
                raise pickle.UnpicklingError("malformed array state")
            for s in state:
                if isinstance(s, np.dtype):
                    _refuse_object_dtype(s)
                elif isinstance(s, list):
                    raise pickle.UnpicklingError("array data given as a list (object array)")
        pickle._Unpickler.load_build(self)
        if isinstance(inst, np.dtype):
            _refuse_object_dtype(inst)

    dispatch[pickle.BUILD[0]] = load_build


def check_plain(root, max_nodes: int | None = None) -> int:
    """Only dicts with str keys, lists, tuples, scalars, None and numeric numpy arrays; no
    cycles, at most MAX_DEPTH deep, expanding to at most max_nodes (MAX_NODES) objects
    (shared references counted as often as they are reached). Each container is entered
    once; returns the number of stack entries handled (the work done)."""
    max_nodes = MAX_NODES if max_nodes is None else max_nodes
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack, work = [(root, 0, False)], 0
    while stack:
        work += 1
        obj, depth, leaving = stack.pop()
        if isinstance(obj, (dict, list, tuple)):
            oid = id(obj)
            children = list(obj.values()) if isinstance(obj, dict) else obj
            if leaving:
                on_path.discard(oid)
                size[oid] = 1 + sum(size.get(id(c), 1) for c in children)
                if size[oid] > max_nodes:
                    raise pickle.UnpicklingError(
                        f"structure expands to more than {max_nodes:,} objects (a reference bomb?)")
                continue
            if oid in size:
                continue
            if oid in on_path:
                raise pickle.UnpicklingError("a container that contains itself")
            if depth >= MAX_DEPTH:
                raise pickle.UnpicklingError(f"containers nested more than {MAX_DEPTH} deep")
            if isinstance(obj, dict) and not all(isinstance(k, str) for k in obj):
                raise pickle.UnpicklingError("a dict with non-string keys")
            on_path.add(oid)
            stack.append((obj, depth, True))
            stack.extend((c, depth + 1, False) for c in children)
        elif isinstance(obj, np.ndarray):
            if obj.dtype.hasobject or obj.dtype.kind not in "biufc":
                raise pickle.UnpicklingError(f"array of dtype {obj.dtype}")
        elif not (obj is None or isinstance(obj, (bool, int, float, str, bytes, np.generic))):
            raise pickle.UnpicklingError(f"unexpected {type(obj).__name__}")
    return work


def read_pickle(path: str | os.PathLike) -> Any:
    """Reads a pickle with the restricted unpickler; ParamsFileError on any problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f).load()
        check_plain(obj)
    except FileNotFoundError:
        raise ParamsFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ParamsFileError(f"{path}: is a directory, not a params file") from None
    except pickle.UnpicklingError as e:
        raise ParamsFileError(f"{path}: not loaded: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged or hostile file raises
        raise ParamsFileError(f"{path}: truncated or corrupt ({type(e).__name__}: {e})") from None
    return obj


def digest(obj) -> str:
    """SHA-256 of a plain structure (as check_plain allows), dict keys in sorted order."""
    h = hashlib.sha256()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            h.update(b"{%d" % len(o))
            for k in sorted(o, reverse=True):
                stack += [o[k], k]
        elif isinstance(o, (list, tuple)):
            h.update(b"[%d" % len(o))
            stack += reversed(o)
        elif isinstance(o, (np.ndarray, np.generic)):
            a = np.ascontiguousarray(o)
            h.update(f"a{a.dtype.str}{a.shape}".encode())
            h.update(a.tobytes())
        else:
            h.update(f"{type(o).__name__}:{o!r};".encode())
    return h.hexdigest()


def with_digest(payload: dict) -> dict:
    return {**payload, "sha256": digest(payload)}


def verify_digest(path, payload: dict) -> None:
    stored = payload.get("sha256")
    body = {k: v for k, v in payload.items() if k != "sha256"}
    if stored != digest(body):
        raise ParamsFileError(f"{path}: checksum mismatch: the file was changed or damaged "
                              "after it was written")
