"""Live training against EleutherAI's sparsify, both reading a running LM: ksae_jax's one run
for every (hookpoint, k) against sparsify's command line, one run per k (it trains one k per
run), at matched settings (Adam, the same lr and batch, AuxK as ours, no warmup) and at its
own defaults (Signum, its automatic lr, AuxK off). Both read the same contexts: sparsify gets
the contexts ksae_jax's run reads, as a tokenized dataset on disk, BOS excluded as ours.

    python -m benchmarks.live --lm runs/lm --out runs/live_bench

Each stage keeps its result as it finishes (OUT/<stage>.json) and is skipped when rerun, so an
interrupted comparison goes on where it stopped. Writes OUT/summary.json (one row per system,
hookpoint and k: fvu, l0, dead_frac_window, delta_loss), OUT/speed.json, OUT/table.md and
OUT/frontier.png (held-out FVU against L0 per hookpoint, sparsify's points on it).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np

from ksae_jax import cli, flags
from ksae_jax.files import write_json

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "benchmarks" / "peers" / "sparsify_cli.py"


@dataclasses.dataclass(frozen=True)
class LivePeers:
    """What ksae_jax and sparsify both train from the running LM, and where a comparison
    writes (benchmarks.live and benchmarks.transcoders)."""

    lm: str
    """The causal LM (a folder; ksae lm writes one)."""
    out: Path
    """Output folder (a rerun goes on from the stages already done)."""
    text: str = "gcide"
    """The text both read."""
    ks: tuple[int, ...] = (32, 64)
    """One SAE per k and hookpoint (sparsify: one run per k)."""
    latents: int = 4096
    """Latents n (16 d for the offline LM)."""
    tokens: int = 2_097_152
    """Training tokens."""
    batch_contexts: int = 32
    """Contexts per step: sparsify's batch; ksae_jax's batch is 4,096 rows (the same tokens
    to within the 32 BOS positions)."""
    dead_tokens: int = 1_000_000
    """Dead after this many tokens without firing (AuxK's window; sparsify's threshold)."""
    context: int = 128
    """Tokens per context, BOS included."""


@dataclasses.dataclass(frozen=True)
class LiveComparison(LivePeers):
    """Live SAEs against sparsify's: what both train, and where the comparison writes."""

    skip_defaults: bool = False
    """Leave out sparsify's run at its own defaults."""
    lm_backend: Literal["jax", "torch"] = "torch"
    """Where ksae_jax runs the LM: torch (as sparsify does; the committed results) or jax."""


def measured(cmd: list[str], log: Path) -> dict:
    """Runs cmd under GNU time: its wall seconds and peak RSS (MB); output kept in log."""
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                           cwd=ROOT)
    text = log.read_text()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (see {log}):\n{text[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return {"wall_seconds": time.perf_counter() - t, "peak_rss_mb": rss / 1024}


def stage(c: LiveComparison, name: str, fn, folder: Path | None = None) -> dict:
    """fn()'s result, kept in OUT/name.json, or folder/name.json (a rerun reads it back
    instead)."""
    path = (folder or c.out) / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = fn()
    write_json(path, result)
    return result


def run_ours(c: LiveComparison) -> dict:
    out = c.out / "ksae_jax"
    cmd = [sys.executable, "-m", "ksae_jax", "train", "--model", c.lm, "--text", c.text,
           "--latents", str(c.latents), "--ks", *map(str, c.ks), "--tokens", str(c.tokens),
           "--context", str(c.context), "--dead-tokens", str(c.dead_tokens), "--out", str(out),
           "--lm-backend", c.lm_backend, "--overwrite", "--no-progress"]
    got = measured(cmd, c.out / "ksae_jax.log")
    m = json.loads((out / "metrics.json").read_text())
    log = (c.out / "ksae_jax.log").read_text()
    estimate = {name: float(v.replace(",", "")) for name, v in re.findall(
        r"(buffer|lm|sae state|heldout|step workspace) ([\d,.]+) MB", log)}
    return {**got, "command": " ".join(cmd[1:]), "tokens": m["tokens"],
            "tokens_per_s": m["tokens_per_s"], "lm_seconds": m["lm_seconds"],
            "seconds": m["seconds"], "estimate_mb": estimate, "hookpoints": m["hookpoints"]}


def contexts_dataset(c: LiveComparison, hookpoints: list[str]) -> dict:
    """The contexts ksae_jax's run reads, in its order, as a datasets folder of input_ids."""
    from datasets import Dataset

    from ksae_jax.lm import live

    lm = live.LiveLM(live.LiveData(model=c.lm, text=c.text, hookpoints=tuple(hookpoints),
                                   context=c.context))
    n = c.tokens // ((c.context - 1) * c.batch_contexts) * c.batch_contexts
    ids = np.stack(list(itertools.islice(lm.train_contexts(seed=0), n)))
    Dataset.from_dict({"input_ids": ids.tolist()}).save_to_disk(str(c.out / "contexts"))
    return {"contexts": n, "tokens": n * (c.context - 1), "bos": lm.bos}


def neighbour_correlation(c: LiveComparison, hookpoints: list[str], batch: int = 4096) -> dict:
    """Mean Pearson correlation of neighbouring rows of a batch (each activation centred by
    the rows' mean), per hookpoint: rows as the contexts give them, and through the mixing
    buffer (ksae_jax's default size)."""
    from ksae_jax.lm import live

    lm = live.LiveLM(live.LiveData(model=c.lm, text=c.text, hookpoints=tuple(hookpoints),
                                   context=c.context))
    stream = live.LiveStream(lm, batch, seed=0)
    chunks = live.row_chunks(lm, 0, 0, stream.half)
    stream.mixer.start(next(chunks), next(chunks))
    plain = np.asarray(stream.mixer.buffer[:, :batch])  # consecutive rows of the contexts
    mixed = np.asarray(stream.mixer.batch(0))

    def corr(rows):
        x = rows - rows.mean(axis=0)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
        return float(np.mean(np.sum(x[:-1] * x[1:], axis=1)))

    return {name: {"without_buffer": corr(plain[h]), "with_buffer": corr(mixed[h])}
            for h, name in enumerate(hookpoints)} | {"buffer_tokens": lm.cfg.buffer_tokens}


def run_peer(c: LiveComparison, k: int, defaults: bool, bos: int) -> dict:
    name = f"sparsify{'_defaults' if defaults else ''}_k{k}"
    cmd = [sys.executable, str(PEER), c.lm, str(c.out / "contexts"), "--layers",
           *map(str, range(_layers(c.lm))), "--k", str(k), "--num_latents", str(c.latents),
           "--batch_size", str(c.batch_contexts), "--exclude_tokens", str(bos),
           "--save_dir", str(c.out / name), "--run_name", "run", "--log_to_wandb", "False",
           "--save_every", "1000000"]
    if not defaults:
        cmd += ["--optimizer", "adam", "--lr", str(_our_lr(c.latents)), "--lr_warmup_steps", "0",
                "--auxk_alpha", str(1 / 32), "--dead_feature_threshold", str(c.dead_tokens)]
    got = measured(cmd, c.out / f"{name}.log")
    clocks = json.loads((c.out / f"{name}.log").read_text().split("\n\tCommand being timed")[0]
                        .strip().splitlines()[-1])
    return {**got, **clocks, "command": " ".join(cmd[1:]), "folder": str(c.out / name / "run")}


def _layers(lm: str) -> int:
    return json.loads((Path(lm) / "config.json").read_text())["n_layer"]


def _our_lr(latents: int) -> float:
    return 2e-4 / (latents / 2 ** 14) ** 0.5  # ksae_jax's default, Gao et al.'s scaling


def main(argv=None) -> dict:
    parser = flags.make_parser("python -m benchmarks.live", __doc__.split("\n\n")[0],
                               [flags.Group("comparison", (LiveComparison,))])
    c = flags.build(LiveComparison, flags.parse(parser, argv))
    c.out.mkdir(parents=True, exist_ok=True)
    ours = stage(c, "ksae_jax", lambda: run_ours(c))
    hookpoints = list(ours["hookpoints"])
    stage(c, "mixing", lambda: neighbour_correlation(c, hookpoints))
    data = stage(c, "contexts", lambda: contexts_dataset(c, hookpoints))
    peers = {}
    for defaults in (False,) if c.skip_defaults else (False, True):
        for k in c.ks:
            name = f"sparsify{'_defaults' if defaults else ''}_k{k}"
            peers[name] = stage(c, name, lambda k=k, d=defaults: run_peer(c, k, d, data["bos"]))
    from benchmarks import live_report
    return live_report.write(c, ours, peers, hookpoints, data["tokens"])


if __name__ == "__main__":
    cli.run(main, "benchmarks.live")
