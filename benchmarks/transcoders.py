"""Transcoders against EleutherAI's sparsify, both reading the running offline LM: ksae_jax's
one run for every layer's MLP and both ks (transcoders, skip transcoders, and a
cross-layer transcoder of the same latents per layer) against
sparsify's command line with `--transcode True` (one run per k: at matched settings, at its
own defaults, and with its skip connection at matched settings). Both read the same contexts
(the ones ksae_jax's run reads, written as a tokenized dataset, BOS excluded as ours), and
every coder is judged the same way: sparsify's folders are read by ksae_jax.load (their own
arithmetic, tests/test_interop.py) and scored on the same held-out pairs and in the same
spliced evaluation (the MLP's output replaced by the transcoder's) as ksae_jax's.

    python -m benchmarks.transcoders --lm runs/lm --out results/transcoders

Each stage keeps its result as it finishes (OUT/<stage>.json) and is skipped when rerun, so
an interrupted comparison goes on where it stopped. Writes OUT/summary.json (rows: system,
arch, layer, k, fvu, l0, dead_frac, delta_loss, kl), OUT/table.md and OUT/replacement.png.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.live import PEER, LivePeers, contexts_dataset, measured, stage
from ksae_jax import cli, flags
from ksae_jax.files import write_json


@dataclasses.dataclass(frozen=True)
class TranscoderComparison(LivePeers):
    """Transcoders against sparsify's: what both train, and where the comparison writes."""

    lm_tokens: int = 16_384
    """Predictions of the spliced evaluation."""
    systems: tuple[str, ...] = ("ksae_jax", "sparsify", "ksae_jax_clt", "sparsify_defaults",
                                "ksae_jax_skip", "sparsify_skip")
    """The runs, in the order they run."""
    skip_ks: tuple[int, ...] = (32,)
    """The ks of sparsify's skip-connection runs (one run each, about 20 minutes on 2 cores;
    ksae_jax's one run trains every k)."""
    defaults_ks: tuple[int, ...] = (32,)
    """The ks of sparsify's runs at its own defaults."""


OURS = {"ksae_jax": ("transcoder", True), "ksae_jax_skip": ("skip-transcoder", True),
        "ksae_jax_clt": ("clt", False)}  # system: (arch, its replacement model measured apart)


def layers(c: TranscoderComparison) -> list[int]:
    return list(range(json.loads((Path(c.lm) / "config.json").read_text())["n_layer"]))


def run_ours(c: TranscoderComparison, arch: str) -> dict:
    out = c.out / arch
    cmd = [sys.executable, "-m", "ksae_jax", "train", "--model", c.lm, "--text", c.text,
           "--arch", arch, "--layers", *map(str, layers(c)), "--latents", str(c.latents),
           "--ks", *map(str, c.ks), "--tokens", str(c.tokens), "--context", str(c.context),
           "--dead-tokens", str(c.dead_tokens), "--lm-tokens", str(c.lm_tokens), "--out", str(out),
           "--overwrite", "--no-progress"]
    got = measured(cmd, c.out / f"{arch}.log")
    m = json.loads((out / "metrics.json").read_text())
    return {**got, "command": " ".join(cmd[1:]), "tokens_per_s": m["tokens_per_s"],
            "rows": our_rows(m, arch)}


def our_rows(m: dict, arch: str) -> list[dict]:
    """Per layer and k (a CLT's per-layer fields), and the replacement model's rows."""
    rows = []
    for name, per in m["hookpoints"].items():
        span = [int(p) for p in name.split(".", 1)[1].split("+")]
        for i, k in enumerate(per["ks"]):
            if "layer_fvu" in per:  # a CLT: one hookpoint over every layer
                rows += [{"system": "ksae_jax", "arch": arch, "layer": layer, "k": k,
                          "fvu": per["layer_fvu"][i][j], "l0": per["layer_l0"][i][j],
                          "delta_loss": per["layer_delta_loss"][i][j],
                          "kl": per["layer_kl"][i][j]} for j, layer in enumerate(span)]
                rows.append({"system": "ksae_jax", "arch": arch, "k": k,
                             "l0": float(np.mean(per["layer_l0"][i])),
                             "replacement_delta_loss": per["replacement_delta_loss"][i],
                             "replacement_kl": per["replacement_kl"][i]})
                continue
            rows.append({"system": "ksae_jax", "arch": arch, "layer": span[0], "k": k,
                         **{f: per[f][i] for f in ("fvu", "l0", "dead_frac", "delta_loss", "kl")}})
    return rows


def replacement_rows(c: TranscoderComparison, system: str, arch: str, folders: dict,
                     rows: list[dict]) -> list[dict]:
    """The replacement model of per-layer transcoders (every layer's MLP replaced at once),
    per k, from their folders {layer: folder} (ksae_jax's or sparsify's, read alike)."""
    import ksae_jax
    from ksae_jax.lm import jax_lm, live, replacement
    from ksae_jax.lm.splice import SpliceEval

    lm = jax_lm.load(c.lm)
    tokenizer = live.LiveLM(live.LiveData(model=c.lm, text=c.text, hookpoints=("mlp.0",),
                                          context=c.context))
    ev = SpliceEval.at(lm, tokenizer.tokenizer, tokenizer.hookpoints[0], tokenizer.held_docs,
                       c.lm_tokens, c.context, name=c.lm)
    out = []
    for k, per_k in folders.items():
        trained = [(f"mlp.{layer}", ksae_jax.load(folder)) for layer, folder in per_k.items()]
        got = replacement.transcoders_replacement(lm, ev.windows, ev.nbytes, trained, [k])
        l0 = np.mean([r["l0"] for r in rows if r["k"] == k and "layer" in r])  # the same run's
        out.append({"system": system, "arch": arch, "k": k, "l0": float(l0),
                    "replacement_delta_loss": got["replacement_delta_loss"][0],
                    "replacement_kl": got["replacement_kl"][0]})
    return out


def run_peer(c: TranscoderComparison, k: int, how: str, bos: int) -> dict:
    """sparsify's command line: `how` is "matched" (Adam at our lr, no warmup, AuxK as ours),
    "defaults" (its own optimizer, lr and AuxK) or "skip" (matched, with its skip connection)."""
    name = f"sparsify_{how}_k{k}"
    cmd = [sys.executable, str(PEER), c.lm, str(c.out / "contexts"), "--hookpoints",
           *[f"h.{layer}.mlp" for layer in layers(c)], "--transcode", "True", "--k", str(k),
           "--num_latents", str(c.latents), "--batch_size", str(c.batch_contexts),
           "--exclude_tokens", str(bos), "--save_dir", str(c.out / name), "--run_name", "run",
           "--log_to_wandb", "False", "--save_every", "1000000"]
    if how != "defaults":
        cmd += ["--optimizer", "adam", "--lr", str(2e-4 / (c.latents / 2 ** 14) ** 0.5),
                "--lr_warmup_steps", "0", "--auxk_alpha", str(1 / 32),
                "--dead_feature_threshold", str(c.dead_tokens)]
    if how == "skip":
        cmd += ["--skip_connection", "True"]
    got = measured(cmd, c.out / f"{name}.log")
    return {**got, "command": " ".join(cmd[1:]), "folder": str(c.out / name / "run")}


def score_peer(c: TranscoderComparison, k: int, how: str, peer: dict) -> list[dict]:
    """Each layer's sparsify transcoder read by ksae_jax and judged as ours are."""
    import ksae_jax
    from ksae_jax.evaluate import EvalSet, evaluate
    from ksae_jax.data.feed import ArrayRows
    from ksae_jax.lm import live
    from ksae_jax.lm.splice import SpliceEval, sae_replacement, scores

    names = [f"mlp.{layer}" for layer in layers(c)]
    lm = live.LiveLM(live.LiveData(model=c.lm, text=c.text, hookpoints=tuple(names),
                                   context=c.context))
    held = lm.heldout()
    rows = []
    for h, layer in enumerate(layers(c)):
        coder = ksae_jax.load(Path(peer["folder"]) / f"h.{layer}.mlp")
        ev = evaluate(coder.config, coder.params, EvalSet(ArrayRows(held[h])))
        splice = SpliceEval.at(lm.backend.splice, lm.tokenizer, lm.hookpoints[h], lm.held_docs,
                               c.lm_tokens, c.context, name=c.lm)
        score = scores(splice.losses({"peer": sae_replacement(coder, k, lm.backend.splice)}),
                       "peer")
        rows.append({"system": "sparsify_defaults" if how == "defaults" else "sparsify",
                     "arch": "skip-transcoder" if how == "skip" else "transcoder",
                     "layer": layer, "k": k, "fvu": float(ev.fvu[0]), "l0": float(ev.l0[0]),
                     "dead_frac": float(ev.dead_frac[0]), "delta_loss": score["delta_loss"],
                     "kl": score["kl"]})
    return rows


def main(argv=None) -> list[dict]:
    parser = flags.make_parser("python -m benchmarks.transcoders", __doc__.split("\n\n")[0],
                               [flags.Group("comparison", (TranscoderComparison,))])
    c = flags.build(TranscoderComparison, flags.parse(parser, argv))
    c.out.mkdir(parents=True, exist_ok=True)
    names = tuple(f"mlp.{layer}" for layer in layers(c))
    data = stage(c, "contexts", lambda: contexts_dataset(c, list(names)))
    rows: list[dict] = []
    for system in c.systems:
        if system.startswith("ksae_jax"):
            arch, separate = OURS[system]
            ours = stage(c, arch, lambda a=arch: run_ours(c, a))["rows"]
            rows += ours
            if separate:  # a CLT's replacement model is in its own run's metrics
                folders = {k: {layer: c.out / arch / f"mlp.{layer}" / "params.pkl"
                               for layer in layers(c)} for k in c.ks}
                rows += stage(c, f"replacement_{arch}", lambda a=arch, f=folders, o=ours:
                              replacement_rows(c, "ksae_jax", a, f, o))
            continue
        how = {"sparsify": "matched", "sparsify_skip": "skip",
               "sparsify_defaults": "defaults"}[system]
        for k in {"skip": c.skip_ks, "defaults": c.defaults_ks}.get(how, c.ks):
            peer = stage(c, f"sparsify_{how}_k{k}", lambda k=k, h=how: run_peer(c, k, h,
                                                                                data["bos"]))
            scored = stage(c, f"scores_{how}_k{k}", lambda k=k, h=how, p=peer:
                           score_peer(c, k, h, p))
            folders = {k: {layer: Path(peer["folder"]) / f"h.{layer}.mlp" for layer in layers(c)}}
            rows += scored + stage(c, f"replacement_{how}_k{k}", lambda f=folders, r=scored:
                                   replacement_rows(c, r[0]["system"], r[0]["arch"], f, r))
    write_json(c.out / "summary.json", rows)
    from benchmarks import transcoders_report
    transcoders_report.write(c, rows)
    return rows


if __name__ == "__main__":
    cli.run(main, "benchmarks.transcoders")
