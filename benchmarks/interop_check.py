"""Benchmark-time check with the real libraries installed (not a CI dependency): SAELens's and
sparsify's own loaders read ksae_jax's exports and reconstruct as ksae_jax does.

    pip install sae-lens eai-sparsify torch==2.13.0
    python -m benchmarks.interop_check       # writes benchmarks/results/DATE_MACHINE/interop.json

Trains a tiny sweep of every SAE family on synthetic vectors (normalised inputs, so that the
input scale must be folded in), exports each to SAELens (and the TopK one to sparsify), loads
them with those libraries and prints the largest reconstruction difference.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import ksae_jax
from benchmarks.measure import results_folder
from ksae_jax.data import synthetic

# each family's sweep of one model, and whether sparsify (TopK only) reads it too
FAMILIES = [("topk", {"ks": (3,)}, True), ("batchtopk", {"ks": (3,)}, False),
            ("matryoshka", {"ks": (3,), "prefixes": (8, 32)}, False),
            ("jumprelu", {"l0_coefs": (1e-3,)}, False)]


def main() -> dict:
    from sae_lens import SAE
    from sparsify import SparseCoder

    x = synthetic.generate(3000, d=16, n_features=24, mean_active=3, seed=0).x * 4 + 1
    held = x[2500:2600]
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch, extra, sparsify_reads in FAMILIES:
            cfg = ksae_jax.sae_config(16, latents=64, steps=30, batch_size=256, normalize=True,
                                      arch=arch, **extra)
            model = ksae_jax.train_sweep(cfg, x[:2500], progress=False).models()
            label = model.labels[0]
            ours = model.reconstruct(held, label)
            sl = SAE.load_from_disk(ksae_jax.export_saelens(model, label, Path(tmp) / arch))
            with torch.no_grad():
                theirs = sl.decode(sl.encode(torch.from_numpy(held))).numpy()
            report[f"saelens {arch}"] = float(np.abs(theirs - ours).max())
            if sparsify_reads:
                coder = SparseCoder.load_from_disk(ksae_jax.export_sparsify(model, 3, Path(tmp) / "sp"))
                with torch.no_grad():
                    enc = coder.encode(torch.from_numpy(held))
                    theirs = coder.decode(enc.top_acts, enc.top_indices).numpy()
                report["sparsify topk"] = float(np.abs(theirs - ours).max())
    import sae_lens
    import sparsify
    result = {"max_abs_diff": report, "tolerance": 1e-5,
              "all_within": all(v <= 1e-5 for v in report.values()),
              "versions": {"sae_lens": sae_lens.__version__,
                           "sparsify": getattr(sparsify, "__version__", "?")}}
    out = results_folder() / "interop.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
