"""ksae_jax's file formats, written atomically and read back safely:

- `params.pkl`: every model of a sweep (numpy arrays, leading axis = model) with its config,
  metrics and a SHA-256 of the payload (format version 2; version 1 files, without the
  checksum, are still read);
- `checkpoint.pkl`: the train state after a step, to resume from;
- a safetensors folder (`params.safetensors` + `config.json`): the same payload as
  params.pkl in a format that cannot run code;
- the ecosystem's SAE folders (sparsify's, SAELens's), read through `interop`.

Reading returns the payload after checking format, version and checksum; what the arrays
must be for a model is checked by `inference.load`. `read_config` reads the config a file
holds, in this version's layout or in any earlier one.
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


# ---------------------------------------------------------------- configs of every version

IMAGE_ARCHS = ("conv", "mlp")
OPTIMIZER_FIELDS = ("optimizer", "lr", "momentum", "warmup_steps", "lr_decay_frac", "clip_norm",
                    "k_start", "k_anneal_frac")


def read_config(d: dict):
    """The SweepConfig a to_dict wrote, in this version's layout (model, optim, execution
    nested) or an earlier one's: one flat config with the optimizer, AuxK and execution
    beside the budget (0.3), or a model config with every field and l1, multi_topk and
    normalize beside the budget (0.2)."""
    from ksae_jax.config import Execution, Optimizer, SweepConfig
    from ksae_jax.models import registry

    d = dict(d) if "optim" in d else _flat_to_nested(d)
    model = _model_fields(dict(d.pop("model")))
    tuples = lambda v: tuple(v) if isinstance(v, list) else v
    optim = {k: tuples(v) for k, v in d.pop("optim").items()}
    return SweepConfig(model=registry.lookup(model.get("arch", "conv")).config(**model),
                       optim=Optimizer(**optim), execution=Execution(**d.pop("execution")),
                       **{k: tuples(v) for k, v in d.items()})


def _flat_to_nested(d: dict) -> dict:
    """An earlier version's flat config in this version's layout."""
    d, model = dict(d), dict(d["model"])
    image = model.get("arch", "conv") in IMAGE_ARCHS
    for moved in ("l1", "multi_topk", "normalize"):  # 0.2: beside the budget
        if moved in d:
            value = d.pop(moved)
            if (moved == "l1") == image:
                model[moved] = value
    if "k_anneal_epochs" in d:  # 0.2: before budgets in steps
        anneal = d.pop("k_anneal_epochs")
        d["k_anneal_frac"] = anneal / d["epochs"] if d.get("epochs") else 0.0
    for name in ("aux_coef", "aux_k", "dead_tokens") + (() if image else ("resample_every",)):
        if name in d:
            model[name] = d.pop(name)
    d.pop("resample_every", None)
    optim = {name: d.pop(name) for name in OPTIMIZER_FIELDS if name in d}
    if "eps" in d:
        optim["adam_eps"] = d.pop("eps")
    if optim.get("k_start") is None:  # k fixed: the anneal fraction was inert, now its default
        optim.pop("k_anneal_frac", None)
    if optim.get("optimizer", "adam") != "sgd":
        optim.pop("momentum", None)
    execution = {name: d.pop(name) for name in ("batching", "eval_every") if name in d}
    return {**d, "model": model, "optim": optim, "execution": execution}


def _model_fields(model: dict) -> dict:
    """A model config's fields as this version names them (earlier versions: one config for
    every arch, the latents called hidden, fields from before the SAE recipe's choices)."""
    if model.get("arch", "conv") in IMAGE_ARCHS:
        for old in ("d_in", "decoder", "normalize", "multi_topk"):
            model.pop(old, None)
        return {**model, "loss": model.get("loss") or "mse"}
    for old in ("tied", "loss", "l1"):
        model.pop(old, None)
    if "hidden" in model:
        model["latents"] = model.pop("hidden")
        model.setdefault("b_dec_init", "median")  # what every version before the mean did
        model.setdefault("init_scale", 1.0)       # ... before these fields: W_enc = W_dec,
        model.setdefault("init_dirs", "random")   # random rows, b_enc zero
        model.setdefault("b_enc_init", "zero")
        model.setdefault("b_enc_mean_keep", 1.0)
        if model.get("arch", "topk") != "topk":   # fields every SAE config held then
            model.pop("decoder", None)
            model.pop("multi_topk", None)
        if model["b_enc_init"] == "zero":         # inert without thresholds: its default
            model.pop("b_enc_mean_keep")
        if model["init_dirs"] != "mixed":
            model.pop("init_mix", None)
    if "prefixes" in model:
        model["prefixes"] = tuple(model["prefixes"])
    return model


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

def load_checkpoint(path) -> dict:
    """A pickled checkpoint of version 0.2 (newer runs keep Orbax checkpoints)."""
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
