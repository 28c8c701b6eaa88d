"""Ground truth against SAELens's own trainers: SynthSAEBench (SAELens's `sae_lens.synthetic`:
features with a hierarchy of mutually exclusive children, low-rank correlated firing,
Zipfian firing probabilities and varying magnitudes) at a scale this machine trains, the
SynthSAEBench-16k recipe's ratios kept. ksae_jax's families train as sweeps over k (one run
each); SAELens's `SAETrainer` trains each (family, k) on the same rows in the same order at
the same lr, batch and samples; SAELens's `eval_sae_on_synthetic_data` scores both (ksae_jax
through its SAELens export) on the same held-out rows: MCC, uniqueness, F1, explained
variance, L0, dead latents. `variants` runs ksae_jax's TopK with one default changed at a
time (the short-budget study, docs/ground_truth.md).

    python -m benchmarks.ground_truth --out results/ground_truth

Each stage keeps its result as it finishes (OUT/stages/<name>.json) and is skipped when
rerun, so an interrupted comparison goes on where it stopped. Writes OUT/summary.json,
OUT/table.md and OUT/mcc_ev_l0.png. Needs `pip install sae-lens` (torch included).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks import live
from benchmarks.live import ROOT, measured
from ksae_jax import cli, flags
from ksae_jax.files import write_json
from ksae_jax.models import registry

os.environ.setdefault("TQDM_DISABLE", "1")  # SAELens's generator and trainer print bars
PEER = ROOT / "benchmarks" / "peers" / "saelens_synth.py"

# ksae_jax's TopK with one default changed (name: flags), for the short-budget study
VARIANTS = {"default": (), "init_scale_1": ("--init-scale", "1"),
            "b_enc_zero": ("--b-enc-init", "zero"), "b_dec_zero": ("--b-dec-init", "zero"),
            "adam_eps_1e-8": ("--adam-eps", "1e-8"), "clip_1": ("--clip-norm", "1"),
            "aux_window_64_steps": ("--dead-tokens", "262144"),
            "b_enc_zero+b_dec_zero": ("--b-enc-init", "zero", "--b-dec-init", "zero"),
            "b_dec_median": ("--b-dec-init", "median"),
            "lr_3x": ("--lr", "9e-4")}  # not a default: how far the step size moves MCC


@dataclasses.dataclass(frozen=True)
class GroundTruth:
    """What both libraries train on SynthSAEBench data, and where the comparison writes."""

    out: Path = Path("results/ground_truth")
    """Output folder (a rerun goes on from the stages already done)."""
    features: int = 4096
    """Ground-truth features (SynthSAEBench-16k: 16,384)."""
    d: int = 256
    """Hidden dimension (SynthSAEBench-16k: 768)."""
    roots: int = 32
    """Hierarchy roots, each a tree of branching 4 and depth 3 with mutually exclusive
    children (SynthSAEBench-16k: 128, the same 66% of the features in a hierarchy)."""
    correlation_rank: int = 8
    """Rank of the firing correlations (SynthSAEBench-16k: 25 in d = 768; the same rank per
    dimension)."""
    bias: float = 0.5
    """Norm of the data's bias."""
    latents: int = 4096
    """Latents of every SAE."""
    ks: tuple[int, ...] = (16, 32)
    """k of every family (BatchTopK's and Matryoshka's mean L0)."""
    budgets: tuple[str, ...] = ("300x4096", "2000x1024")
    """Training budgets, STEPSxBATCH, each run by both libraries."""
    archs: tuple[str, ...] = ("topk", "batchtopk", "matryoshka", "jumprelu")
    """ksae_jax's families, each one run over its sweep (ks, or JumpReLU's l0_coefs)."""
    peer_archs: tuple[str, ...] = ("topk", "batchtopk", "matryoshka")
    """SAELens's families (its trainer), one run per k."""
    later_archs: tuple[str, ...] = ("topk",)
    """ksae_jax's families at the budgets after the first (BatchTopK's, Matryoshka's and
    JumpReLU's dense steps take about 1 s per model and step here, both libraries')."""
    later_peer_archs: tuple[str, ...] = ("topk",)
    """SAELens's families at the budgets after the first."""
    l0_coefs: tuple[float, ...] = (1e-3, 1e-2)
    """The sweep of a family without k (JumpReLU): its L0 coefficients."""
    init_l0: int = 24
    """Where such a family's thresholds start (latents firing per row), between the ks."""
    variants: tuple[str, ...] = tuple(VARIANTS)
    """ksae_jax TopK variants of the short-budget study, at the first budget."""
    lr: float = 3e-4
    """Adam's constant learning rate, both libraries."""
    eval_rows: int = 65_536
    """Held-out rows the evaluator generates (the same for every SAE)."""
    seed: int = 0
    """The synthetic model's seed and the rows' order."""


def budget(text: str) -> tuple[int, int]:
    steps, batch = text.split("x")
    return int(steps), int(batch)


def stage(c: GroundTruth, name: str, fn):
    """fn()'s result, kept in OUT/stages/name.json (a rerun reads it back instead)."""
    return live.stage(c, name, fn, c.out / "stages")


def synthetic_model(c: GroundTruth):
    """SynthSAEBench-16k's recipe at this scale (built once, then read from OUT/model)."""
    from sae_lens.synthetic import (FoldedNormalMagnitudeConfig, HierarchyConfig,
                                    LinearMagnitudeConfig, SyntheticModel,
                                    ZipfianFiringProbabilityConfig)
    from sae_lens.synthetic.synthetic_model import (LowRankCorrelationConfig,
                                                    OrthogonalizationConfig,
                                                    SyntheticModelConfig)
    path = c.out / "model"
    if path.exists():
        return SyntheticModel.load_from_disk(path)
    model = SyntheticModel(SyntheticModelConfig(
        num_features=c.features, hidden_dim=c.d,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4,
                                                          min_prob=5e-4),
        hierarchy=HierarchyConfig(total_root_nodes=c.roots, branching_factor=4, max_depth=3,
                                  mutually_exclusive_portion=1.0),
        orthogonalization=OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=LowRankCorrelationConfig(rank=c.correlation_rank, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=c.bias, seed=c.seed))
    model.save(path)
    return model


def write_rows(c: GroundTruth, model) -> dict:
    """The training rows (enough for the largest budget) and held-out rows, written once."""
    import torch
    n = max(s * b for s, b in map(budget, c.budgets))
    torch.manual_seed(c.seed + 1)
    for name, rows in (("train", n), ("heldout", c.eval_rows)):
        out = np.lib.format.open_memmap(c.out / f"{name}.npy", "w+", np.float32, (rows, c.d))
        for start in range(0, rows, 65_536):
            out[start:start + 65_536] = model.sample(min(65_536, rows - start)).numpy()
        out.flush()
    return {"train_rows": n, "heldout_rows": c.eval_rows}


def run_ours(c: GroundTruth, arch: str, spec: str, extra: tuple[str, ...], name: str) -> dict:
    """One ksae_jax run over the family's sweep, each model exported to SAELens's format."""
    steps, batch = budget(spec)
    out = c.out / "runs" / name
    axis = registry.lookup(arch).config.sweeps_over  # "ks" or "l0_coefs"
    values = {"ks": c.ks, "l0_coefs": c.l0_coefs}[axis]
    sweep = {"ks": ("--ks", *map(str, c.ks)),
             "l0_coefs": ("--l0-coefs", *map(str, c.l0_coefs), "--init-l0", str(c.init_l0))}
    cmd = [sys.executable, "-m", "ksae_jax", "train", "--data", str(c.out / "train.npy"),
           "--eval-data", str(c.out / "heldout.npy"), "--arch", arch,
           "--latents", str(c.latents), *sweep[axis], "--steps", str(steps),
           "--batch-size", str(batch), "--lr", str(c.lr), "--feeder", "host",
           "--seed", str(c.seed), "--out", str(out), "--overwrite", "--no-progress", *extra]
    got = measured(cmd, c.out / "runs" / f"{name}.log")
    label, folders = axis[:-1], {}
    for v in values:
        folders[f"{v:g}"] = str(out / f"saelens_{label}_{v:g}")
        measured([sys.executable, "-m", "ksae_jax", "export", str(out / "params.pkl"),
                  "--format", "saelens", "--model", f"{label}={v:g}", "--out", folders[f"{v:g}"]],
                 c.out / "runs" / f"{name}_export.log")
    return {**got, "command": " ".join(cmd[1:]), "label": label, "folders": folders}


def run_peer(c: GroundTruth, arch: str, spec: str, k: int, name: str) -> dict:
    """SAELens's trainer on one (family, k)."""
    steps, batch = budget(spec)
    out = c.out / "runs" / name
    cmd = [sys.executable, str(PEER), "--data", str(c.out / "train.npy"), "--arch", arch,
           "--k", str(k), "--latents", str(c.latents), "--steps", str(steps),
           "--batch-size", str(batch), "--lr", str(c.lr), "--seed", str(c.seed),
           "--out", str(out)]
    got = measured(cmd, c.out / "runs" / f"{name}.log")
    timing = json.loads((out / "timing.json").read_text())
    return {**got, "command": " ".join(cmd[1:]), "folders": {k: str(out)},
            "train_seconds": timing["train_seconds"]}


def score(c: GroundTruth, model, folder: str) -> dict:
    """SAELens's evaluator on the same held-out rows for every SAE."""
    import torch
    from sae_lens import SAE
    from sae_lens.synthetic import eval_sae_on_synthetic_data
    sae = SAE.load_from_disk(folder)
    torch.manual_seed(c.seed + 2)  # the evaluator's rows: the same for every SAE
    r = eval_sae_on_synthetic_data(sae, model.feature_dict, model.activation_generator,
                                   num_samples=c.eval_rows, batch_size=8192)
    return {"l0": r.sae_l0, "true_l0": r.true_l0, "mcc": r.mcc, "f1": r.classification.f1_score,
            "precision": r.classification.precision, "recall": r.classification.recall,
            "ev": r.explained_variance, "dead": r.dead_latents / c.latents,
            "uniqueness": r.uniqueness, "shrinkage": r.shrinkage}


def random_decoder_mcc(c: GroundTruth, model) -> float:
    """The MCC of random unit decoder rows: the chance level."""
    import torch
    from sae_lens.synthetic import mean_correlation_coefficient
    g = torch.Generator().manual_seed(c.seed + 3)
    return mean_correlation_coefficient(torch.randn(c.latents, c.d, generator=g),
                                        model.feature_dict.feature_vectors.detach())


def scored_rows(c, model, system, spec, name, run, variant=None) -> list[dict]:
    """One row per model of a run (its k, or JumpReLU's l0_coef), scored; wall_seconds: the
    run's share (a ksae_jax run trains all its models at once)."""
    steps, batch = budget(spec)
    label, rows = run.get("label", "k"), []
    for value, folder in run["folders"].items():
        key = f"score_{name}" if system == "saelens" else f"score_{name}_{label[0]}{value}"
        rows.append({"system": system, "arch": run["arch"],
                     **{"k": None, label: int(value) if label == "k" else float(value)},
                     "steps": steps, "batch": batch, **({"variant": variant} if variant else {}),
                     "wall_seconds": run["wall_seconds"] / len(run["folders"]),
                     **stage(c, key, lambda f=folder: score(c, model, f))})
    return rows


def comparison(c: GroundTruth, model, spec: str, archs, peer_archs) -> list[dict]:
    """The families at one budget: ksae_jax's one run per family, SAELens's one per k."""
    rows = []
    for arch in archs:
        name = f"ksae_jax_{arch}_{spec}"
        run = stage(c, name, lambda a=arch, n=name: run_ours(c, a, spec, (), n))
        rows += scored_rows(c, model, "ksae_jax", spec, name, {**run, "arch": arch})
    for arch in peer_archs:
        for k in c.ks:
            name = f"saelens_{arch}_{spec}_k{k}"
            run = stage(c, name, lambda a=arch, k=k, n=name: run_peer(c, a, spec, k, n))
            rows += scored_rows(c, model, "saelens", spec, name, {**run, "arch": arch})
    return rows


def variants(c: GroundTruth, model) -> list[dict]:
    """ksae_jax's TopK at the first budget with one default changed at a time."""
    rows, spec = [], c.budgets[0]
    for variant in c.variants:
        if variant == "default":
            continue
        name = f"ksae_jax_topk_{spec}_{variant}"
        run = stage(c, name, lambda v=variant, n=name: run_ours(c, "topk", spec, VARIANTS[v], n))
        rows += scored_rows(c, model, "ksae_jax", spec, name, {**run, "arch": "topk"}, variant)
    return rows


def main(argv=None) -> dict:
    parser = flags.make_parser("python -m benchmarks.ground_truth", __doc__.split("\n\n")[0],
                               [flags.Group("comparison", (GroundTruth,))])
    c = flags.build(GroundTruth, flags.parse(parser, argv))
    for sub in ("runs", "stages"):
        (c.out / sub).mkdir(parents=True, exist_ok=True)
    model = synthetic_model(c)
    stage(c, "rows", lambda: write_rows(c, model))
    rows = comparison(c, model, c.budgets[0], c.archs, c.peer_archs) + variants(c, model)
    for spec in c.budgets[1:]:
        rows += comparison(c, model, spec, c.later_archs, c.later_peer_archs)
    summary = {"random_decoder_mcc": stage(c, "random", lambda: random_decoder_mcc(c, model)),
               "features": c.features, "d": c.d, "rows": rows}
    write_json(c.out / "summary.json", summary)
    from benchmarks import ground_truth_report
    ground_truth_report.write(c, summary)
    return summary


if __name__ == "__main__":
    cli.run(main, "benchmarks.ground_truth")
