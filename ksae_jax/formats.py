"""ksae_jax's file formats, written atomically and read back safely:

- `params.pkl`: every model of a sweep (numpy arrays, leading axis = model) with its config,
  metrics and a SHA-256 of the payload (format version 2; version 1 files, without the
  checksum, are still read);
- `checkpoint.pkl`: the train state after a step, to resume from;
- a safetensors folder (`params.safetensors` + `config.json`): the same payload as
  params.pkl in a format that cannot run code;
- the ecosystem's SAE folders (sparsify's, SAELens's), read through `interop`.

Reading returns the payload after checking format, version and checksum; what the arrays
must be for a model is checked by `inference.load`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ksae_jax import interop
from ksae_jax.files import strict_json, write_bytes, write_json, write_pickle
from ksae_jax.safe_pickle import (
    ParamsFileError,
    read_pickle,
    verify_digest,
    with_digest,
)

PARAMS_FORMAT = "ksae_jax.params"
PARAMS_VERSION = 2           # 2: SHA-256 of the payload; 1 (no checksum) is still read
CHECKPOINT_FORMAT = "ksae_jax.checkpoint"
CHECKPOINT_VERSION = 2       # 2: step-based train state
EXPORT_FORMAT = "ksae_jax.safetensors"
EXPORT_PARAMS, EXPORT_CONFIG = "params.safetensors", "config.json"


# ---------------------------------------------------------------- params files

def params_payload(*, config: dict, ks, params: dict, metrics: dict | None = None,
                   input_scale: float = 1.0, extra: dict | None = None) -> dict:
    """What a params file holds (before its checksum)."""
    import jax

    return {"format": PARAMS_FORMAT, "version": PARAMS_VERSION, "config": config,
            "ks": [int(k) for k in ks], "params": jax.tree.map(np.asarray, params),
            "metrics": strict_json(metrics or {}), "input_scale": float(input_scale),
            **(extra or {})}


def save_params(path, **payload) -> Path:
    """params.pkl from params_payload's fields, with a SHA-256 of the whole payload."""
    return write_pickle(path, with_digest(params_payload(**payload)))


def _read_versioned(path, fmt: str, versions, keys, what: str) -> dict:
    payload = read_pickle(path)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ParamsFileError(f"{path}: not a ksae_jax {what}")
    version = payload.get("version")
    if version not in versions:
        raise ParamsFileError(f"{path}: format version {version!r} is not supported (this "
                              f"ksae_jax reads version {' and '.join(map(str, versions))})")
    for key in keys:
        if key not in payload:
            raise ParamsFileError(f"{path}: missing {key!r}")
    if version >= 2:
        verify_digest(path, payload)
    return payload


def load_params_file(path) -> dict:
    """The payload of a params.pkl after checking format, version and checksum (version 1
    files carry no checksum: payload["checksum"] says which)."""
    payload = _read_versioned(path, PARAMS_FORMAT, (1, PARAMS_VERSION),
                              ("config", "ks", "params"), "params file")
    payload["checksum"] = "sha256" if "sha256" in payload else "none (version 1 file)"
    return payload


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, *, config: dict, step: int, state, history: dict,
                    seconds: float) -> Path:
    """Everything needed to continue a sweep after `step` steps: the train state's leaves
    (params, Adam states, dead-latent counters, divergence steps), the history so far and
    the config. The data order is a function of (seed, step), so the step is the RNG state."""
    import jax

    payload = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
        "step": int(step), "state": [np.asarray(leaf) for leaf in jax.tree.leaves(state)],
        "history": strict_json(history), "seconds": float(seconds),
    }
    return write_pickle(path, with_digest(payload))


def load_checkpoint(path) -> dict:
    return _read_versioned(path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,),
                           ("config", "step", "state", "history", "seconds"), "checkpoint")


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: saved vs current' for every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != \
                (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now")
    return out


# ---------------------------------------------------------------- safetensors folders

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.ascontiguousarray(value, np.float32)
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def write_safetensors_dir(out: Path, *, config: dict, ks, params: dict, input_scale: float,
                          metrics: dict) -> Path:
    """out/params.safetensors (arrays named by their path, leading model axis) and
    out/config.json (config, ks, input scale, metrics)."""
    from safetensors.numpy import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / EXPORT_PARAMS, save(_flatten(params)))
    write_json(out / EXPORT_CONFIG, {"format": EXPORT_FORMAT, "config": config, "ks": list(ks),
                                     "input_scale": input_scale, "metrics": metrics})
    return out


def read_safetensors_dir(path: Path) -> dict:
    """The payload of a write_safetensors_dir folder, like a params file's."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads((path / EXPORT_CONFIG).read_text())
        flat = load_file(str(path / EXPORT_PARAMS))
    except FileNotFoundError as e:
        raise ParamsFileError(f"{path}: not a ksae_jax export ({Path(e.filename).name} missing)") from None
    except Exception as e:  # noqa: BLE001 - malformed JSON or safetensors
        raise ParamsFileError(f"{path}: unreadable export ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ParamsFileError(f"{path}: {EXPORT_CONFIG} is not a ksae_jax export")
    return {"config": meta.get("config"), "ks": meta.get("ks"), "params": _unflatten(flat),
            "input_scale": meta.get("input_scale", 1.0), "metrics": meta.get("metrics") or {}}


def read_payload(path: Path) -> dict:
    """The payload of a params.pkl, a ksae_jax safetensors folder, or a sparsify or SAELens
    SAE folder (interop)."""
    path = Path(path)
    if not path.is_dir():
        return load_params_file(path)
    if (path / EXPORT_CONFIG).is_file():
        return read_safetensors_dir(path)
    kind = interop.detect(path)
    if kind is None:
        raise ParamsFileError(f"{path}: neither a ksae_jax export ({EXPORT_CONFIG} + "
                              f"{EXPORT_PARAMS}), a sparsify folder (cfg.json + sae.safetensors) "
                              "nor a SAELens folder (cfg.json + sae_weights.safetensors)")
    return interop.READERS[kind](path)
