"""Exports in the formats the SAE ecosystem exchanges (safetensors cannot run code): the whole
sweep as safetensors + JSON (readable by ksae_jax.load), one k's TopK SAE in EleutherAI
sparsify's on-disk layout (SparseCoder.load_from_disk), and one SAE of any family in SAELens's
(SAE.load_from_disk)."""
from __future__ import annotations

import os
from pathlib import Path

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
    if type(m) is not VectorSAE:
        raise ValueError(f"sparsify holds TopK SAEs on vectors; this file holds "
                         f"{m.model_config.arch!r} models (export_saelens takes every SAE)")
    mc = m.model_config
    tensors = {name: np.ascontiguousarray(a, np.float32)
               for name, a in sparsify_tensors(m.params_for(k), m.input_scale).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / "sae.safetensors", save(tensors))
    write_json(out / "cfg.json", {"activation": "topk", "expansion_factor": max(1, mc.hidden // mc.d_in),
                                  "normalize_decoder": True, "num_latents": mc.hidden, "k": int(k),
                                  "multi_topk": mc.multi_topk, "skip_connection": False,
                                  "transcode": False, "d_in": mc.d_in})
    return out


def export_saelens(path_or_models, k_or_index=None, out_dir: str | os.PathLike = "sae") -> Path:
    """Writes one SAE of a params file (or a loaded sweep) in SAELens's layout: out_dir/cfg.json
    and sae_weights.safetensors, so that sae_lens.SAE.load_from_disk(out_dir) reconstructs
    what ours does. k_or_index names the model (its k, JumpReLU's L0 coefficient, or None for
    a file of one model); TopK becomes SAELens's topk, the other families its jumprelu."""
    m = _as_models(path_or_models)
    if not isinstance(m, VectorSAE):
        raise ValueError(f"SAELens holds SAEs on vectors; this file holds {m.model_config.arch!r} "
                         "image models")
    architecture, k, threshold = m.saelens_view(k_or_index)
    mc = m.model_config
    tensors = interop.saelens_tensors(m.params_for(k_or_index), m.input_scale, threshold)
    metadata = {"exported_by": "ksae_jax", "ksae_jax_arch": mc.arch,
                m.config.label_name: m.labels[m.index(k_or_index)]}
    return interop.write_saelens(Path(out_dir), architecture=architecture, d_in=mc.d_in,
                                 d_sae=mc.hidden, tensors=tensors, k=k, metadata=metadata)
