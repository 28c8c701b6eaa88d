"""Exports in the formats the SAE ecosystem exchanges (safetensors cannot run code): the whole
sweep as safetensors + JSON (readable by ksae_jax.load), one k's TopK SAE or transcoder
in EleutherAI sparsify's on-disk layout (SparseCoder.load_from_disk), and one SAE of any family in SAELens's
(SAE.load_from_disk)."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from ksae_jax import interop
from ksae_jax.files import write_bytes, write_json
from ksae_jax.formats import write_safetensors_dir
from ksae_jax.inference import Loaded, VectorSAE, load


def _as_models(path_or_models) -> Loaded:
    return path_or_models if isinstance(path_or_models, Loaded) else load(path_or_models)


def export_safetensors(path_or_models, out_dir: str | os.PathLike) -> Path:
    """Writes every model of a params file (or a loaded sweep) to out_dir as
    params.safetensors (arrays with a leading model axis, named by their path) and
    config.json (config, ks, input scale, metrics)."""
    m = _as_models(path_or_models)
    return write_safetensors_dir(Path(out_dir), config=m.config.to_dict(), ks=m.ks,
                                 params=m.params, input_scale=m.input_scale, metrics=m.metrics)


def sparsify_tensors(params: dict, input_scale: float) -> dict:
    """One TopK SAE's (or transcoder's) params in sparsify's names, with the input scale s
    folded in: ours computes z = TopK(ReLU(W_enc (s x - b_dec) + b_enc)),
    x_hat = (W_dec^T z + b_dec) / s, which is sparsify's with encoder.weight = s W_enc,
    W_dec = W_dec / s, b_dec = b_dec / s (a transcoder's s is 1; its skip map is W_skip)."""
    s = np.float32(input_scale)
    return {"encoder.weight": np.asarray(params["W_enc"]) * s,
            "encoder.bias": np.asarray(params["b_enc"]),
            "W_dec": np.asarray(params["W_dec"]) / s,
            "b_dec": np.asarray(params["b_dec"]) / s,
            **({"W_skip": np.asarray(params["W_skip"])} if "W_skip" in params else {})}


def export_sparsify(path_or_models, k: int | None, out_dir: str | os.PathLike) -> Path:
    """Writes the TopK SAE of k in sparsify's layout: out_dir/sae.safetensors and cfg.json,
    so that sparsify.SparseCoder.load_from_disk(out_dir) reconstructs what ours does."""
    from safetensors.numpy import save

    m = _as_models(path_or_models)
    fields = m.sparsify_fields() if isinstance(m, VectorSAE) else None
    if fields is None:
        raise ValueError(f"sparsify holds TopK SAEs and transcoders; this file holds "
                         f"{m.model_config.arch!r} models (export_saelens takes every SAE)")
    mc, k = m.model_config, m.ks[m.index(k)]
    tensors = {name: np.ascontiguousarray(a, np.float32)
               for name, a in sparsify_tensors(m.params_for(k), m.input_scale).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "sae.safetensors", save(tensors))
    write_json(out / "cfg.json", {"activation": "topk", "expansion_factor": max(1, mc.latents // mc.d_in),
                                  "num_latents": mc.latents, "k": int(k), **fields,
                                  "skip_connection": "W_skip" in tensors, "d_in": mc.d_in})
    return out


def export_saelens(path_or_models, label=None, out_dir: str | os.PathLike = "sae") -> Path:
    """Writes one SAE of a params file (or a loaded sweep) in SAELens's layout: out_dir/cfg.json
    and sae_weights.safetensors, so that sae_lens.SAE.load_from_disk(out_dir) reconstructs
    what ours does. label names the model (its k, JumpReLU's L0 coefficient, "k=32", or None
    for a file of one model); TopK becomes SAELens's topk, the other families its jumprelu."""
    m = _as_models(path_or_models)
    if not isinstance(m, VectorSAE):
        raise ValueError(f"SAELens holds SAEs on vectors; this file holds {m.model_config.arch!r} "
                         "image models")
    architecture, k, threshold = m.saelens_view(label)
    mc = m.model_config
    tensors = interop.saelens_tensors(m.params_for(label), m.input_scale, threshold)
    metadata = {"exported_by": "ksae_jax", "ksae_jax_arch": mc.arch,
                m.label_name: m.labels[m.index(label)]}
    return interop.write_saelens(Path(out_dir), architecture=architecture, d_in=mc.d_in,
                                 d_sae=mc.latents, tensors=tensors, k=k, metadata=metadata,
                                 **m.saelens_fields())


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """A trained sweep (or one model of it) written in the ecosystem's formats."""

    params: Path
    """A params.pkl (or any folder ksae_jax.load reads), or a live run's folder: every
    hookpoint's models, one folder each."""
    format: Literal["safetensors", "saelens", "sparsify"] = "safetensors"
    """safetensors: every model, readable by ksae_jax.load (a CLT's layout: docs/transcoders.md);
    saelens: one SAE of any family (SAE.load_from_disk); sparsify: one TopK SAE or
    transcoder (SparseCoder.load_from_disk)."""
    model: str | None = None
    """saelens, sparsify: the model, by its label (32, k=32, l0_coef=0.001; None: the only one)."""
    out: Path | None = None
    """The folder written (None: beside params, named after the format and the model)."""

    positional: ClassVar[tuple] = ("params",)


def export(cfg: ExportConfig) -> Path:
    """`ksae export`: the folder cfg asks for, written; for a live run's folder (one
    subfolder per hookpoint), one folder per hookpoint under the output folder."""
    folders = hookpoint_folders(Path(cfg.params))
    if folders:
        out = cfg.out or Path(cfg.params) / cfg.format
        for name in folders:
            export(dataclasses.replace(cfg, params=Path(cfg.params) / name / "params.pkl",
                                       out=out / name))
        return out
    m = load(cfg.params)
    label = None if cfg.model is None else (cfg.model if "=" in cfg.model else
                                            f"{m.label_name}={cfg.model}")
    tag = "" if label is None else "_" + label.replace("=", "")
    out = cfg.out or Path(cfg.params).parent / f"{cfg.format}{tag}"
    if cfg.format == "safetensors":
        if label is not None:
            raise ValueError("the safetensors export holds every model: drop --model")
        path = export_safetensors(m, out)
    elif cfg.format == "saelens":
        path = export_saelens(m, label, out)
    else:
        path = export_sparsify(m, label, out)
    print(f"wrote {path}")
    return path


def hookpoint_folders(path: Path) -> list[str]:
    """The hookpoint subfolders of a live run's folder (its metrics.json names them)."""
    import json
    metrics = path / "metrics.json"
    if not (path.is_dir() and metrics.is_file()):
        return []
    names = json.loads(metrics.read_text()).get("hookpoints", {})
    return [n for n in names if (path / n / "params.pkl").is_file()]
