"""Exports in the formats the SAE ecosystem exchanges (safetensors cannot run code):
the whole sweep as safetensors + JSON (readable by ksae_jax.load), and one k's TopK SAE in
EleutherAI sparsify's on-disk layout (SparseCoder.load_from_disk)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ksae_jax.checkpoint import ParamsFileError, write_bytes, write_json

EXPORT_FORMAT = "ksae_jax.safetensors"
PARAMS_FILE, CONFIG_FILE = "params.safetensors", "config.json"


def _as_models(path_or_models):
    from ksae_jax.inference import _Models, load
    return path_or_models if isinstance(path_or_models, _Models) else load(path_or_models)


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


def export_safetensors(path_or_models, out_dir: str | os.PathLike) -> Path:
    """Writes every model of a params file (or a loaded sweep) to out_dir as
    params.safetensors (arrays with a leading model axis, named by their path) and
    config.json (config, ks, input scale, metrics)."""
    from safetensors.numpy import save

    m = _as_models(path_or_models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / PARAMS_FILE, save(_flatten(m.params)))
    write_json(out / CONFIG_FILE, {"format": EXPORT_FORMAT, "config": m.config.to_dict(),
                                   "ks": list(m.ks), "input_scale": m.input_scale,
                                   "metrics": m.metrics})
    return out


def read_safetensors_dir(path: Path) -> dict:
    """The payload of an export_safetensors folder (checked by ksae_jax.load like a pickle's)."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        flat = load_file(str(path / PARAMS_FILE))
    except FileNotFoundError as e:
        raise ParamsFileError(f"{path}: not a ksae_jax export ({Path(e.filename).name} missing)") from None
    except Exception as e:  # noqa: BLE001 - malformed JSON or safetensors
        raise ParamsFileError(f"{path}: unreadable export ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ParamsFileError(f"{path}: {CONFIG_FILE} is not a ksae_jax export")
    return {"config": meta.get("config"), "ks": meta.get("ks"), "params": _unflatten(flat),
            "input_scale": meta.get("input_scale", 1.0), "metrics": meta.get("metrics") or {}}


def sparsify_tensors(params: dict, input_scale: float) -> dict:
    """One TopK SAE's params in sparsify's names, with the input scale s folded in:
    ours computes z = TopK(ReLU(W_enc (s x - b_dec) + b_enc)), x_hat = (W_dec^T z + b_dec) / s,
    which is sparsify's with encoder.weight = s W_enc, W_dec = W_dec / s, b_dec = b_dec / s."""
    s = np.float32(input_scale)
    return {"encoder.weight": np.asarray(params["W_enc"]) * s,
            "encoder.bias": np.asarray(params["b_enc"]),
            "W_dec": np.asarray(params["W_dec"]) / s,
            "b_dec": np.asarray(params["b_dec"]) / s}


def export_sparsify(path_or_models, k: int, out_dir: str | os.PathLike) -> Path:
    """Writes the TopK SAE of k in sparsify's layout: out_dir/sae.safetensors and cfg.json,
    so that sparsify.SparseCoder.load_from_disk(out_dir) reconstructs what ours does."""
    from safetensors.numpy import save

    m = _as_models(path_or_models)
    mc = m.model_config
    if mc.arch != "topk":
        raise ValueError(f"sparsify holds TopK SAEs on vectors; this file holds arch {mc.arch!r}")
    tensors = {name: np.ascontiguousarray(a, np.float32)
               for name, a in sparsify_tensors(m.params_for(k), m.input_scale).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "sae.safetensors", save(tensors))
    write_json(out / "cfg.json", {"activation": "topk", "expansion_factor": max(1, mc.hidden // mc.d_in),
                                  "normalize_decoder": True, "num_latents": mc.hidden, "k": int(k),
                                  "multi_topk": m.config.multi_topk, "skip_connection": False,
                                  "transcode": False, "d_in": mc.d_in})
    return out
