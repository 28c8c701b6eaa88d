"""EleutherAI's sparsify, the peer: its own SparseCoder (with its fused encoder backward and
embedding-bag decoder, and its Triton kernels on a GPU) trained the way its Trainer trains one
(sparsify/trainer.py): b_dec set to the first batch's mean, decoder rows renormalised before
every forward, the gradient's component along them removed before every step, AuxK over the
latents whose tokens-since-fired counter passed dead_tokens, loss fvu + auxk_alpha * auxk.
The optimizer is Adam at the lr the comparison sets (default Gao et al.'s 2e-4 / sqrt(n /
2^14), as sparsify's adam), constant: sparsify's default Signum and the warmup-then-decay
schedule it puts on Adam are left out so that both libraries train with the same optimizer.

    python benchmarks/peers/sparsify_topk.py --data acts.npy --latents 16384 --k 32 --steps 30
    python benchmarks/peers/sparsify_topk.py --data train.npy --eval-data test.npy \
        --latents 8192 --k 8 --steps 400 --out sparsify_k8.json --save sparsify_k8/

Needs `pip install torch==2.13.0 eai-sparsify`. Prints one JSON line (the benchmarks read it).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import resource
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ksae_jax import flags  # noqa: E402


@dataclasses.dataclass(frozen=True)
class PeerRun:
    """One sparsify SparseCoder trained as its Trainer trains one."""

    data: Path
    """Training vectors (.npy); without eval_data its last eval_n rows are held out."""
    latents: int
    """Latents n."""
    k: int
    """Latents kept per vector."""
    eval_data: Path | None = None
    """Held-out vectors (.npy)."""
    eval_n: int = 8192
    """Rows held out from the end of data when there is no eval_data."""
    batch_size: int = 4096
    """Vectors per step."""
    steps: int = 30
    """Optimizer steps (batches drawn without replacement, reshuffled each pass)."""
    warmup: int = 3
    """Steps not timed."""
    lr: float | None = None
    """Adam's lr (None: 2e-4 / sqrt(latents / 2^14))."""
    auxk_alpha: float = 1 / 32
    """Weight of AuxK (0: off)."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many training vectors without firing."""
    threads: int = 0
    """torch's threads (0: its default)."""
    seed: int = 0
    """Init and data order."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where it trains."""
    out: Path | None = None
    """Also write the JSON result here."""
    save: Path | None = None
    """Save the trained coder here (SparseCoder.save_to_disk)."""


def sparse_coder():
    """sparsify's SparseCoder and its config; where the package's trainer cannot import (a GPU
    image without `datasets`), its coder modules alone."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        spec = importlib.util.find_spec("sparsify")
        package = types.ModuleType("sparsify")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["sparsify"] = package
        from sparsify.config import SparseCoderConfig
        from sparsify.sparse_coder import SparseCoder
    return SparseCoder, SparseCoderConfig


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def held_out(sae, x: torch.Tensor, chunk: int = 4096):
    """FVU over all of x and the fraction of latents that never fire on it."""
    sse, fired = 0.0, torch.zeros(sae.num_latents, dtype=torch.bool, device=x.device)
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        enc = sae.encode(xb)
        sse += float((xb - sae.decode(enc.top_acts, enc.top_indices)).pow(2).sum())
        fired[enc.top_indices[enc.top_acts > 0]] = True
    return sse / float((x - x.mean(0)).pow(2).sum()), float((~fired).float().mean())


def train_steps(cfg: PeerRun, sae, data: torch.Tensor) -> float:
    """cfg.steps of the trainer's step on shuffled batches; seconds of the timed ones."""
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr or 2e-4 / (cfg.latents / 2 ** 14) ** 0.5)
    since_fired = torch.zeros(cfg.latents, dtype=torch.long, device=data.device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    order, pos, bs, start = torch.randperm(len(data), generator=gen), 0, cfg.batch_size, None
    for step in range(cfg.steps):
        if step == cfg.warmup:
            sync(cfg.device)
            start = time.perf_counter()
        if pos + bs > len(data):
            order, pos = torch.randperm(len(data), generator=gen), 0
        x, pos = data[order[pos:pos + bs].to(data.device)], pos + bs
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > cfg.dead_tokens if cfg.auxk_alpha > 0 else None)
        (out.fvu + cfg.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            since_fired += bs
            since_fired[out.latent_indices.flatten()] = 0
    sync(cfg.device)
    return time.perf_counter() - start if start else float("nan")


def run(cfg: PeerRun) -> tuple[dict, object]:
    """(the JSON result, the trained coder)."""
    if not cfg.device.startswith("cuda"):
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    SparseCoder, SparseCoderConfig = sparse_coder()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    arr = np.load(cfg.data, mmap_mode="r")
    train = arr if cfg.eval_data else arr[:-cfg.eval_n]
    held = np.load(cfg.eval_data, mmap_mode="r") if cfg.eval_data else arr[-cfg.eval_n:]
    data = torch.from_numpy(np.array(train, np.float32)).to(cfg.device)
    held = torch.from_numpy(np.array(held, np.float32)).to(cfg.device)
    sae = SparseCoder(data.shape[1], SparseCoderConfig(num_latents=cfg.latents, k=cfg.k),
                      device=cfg.device)
    elapsed, timed = train_steps(cfg, sae, data), cfg.steps - cfg.warmup
    sae.set_decoder_norm_to_unit_norm()
    fvu, dead = held_out(sae, held)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cfg.device.startswith("cuda") else None
    result = {
        "peer": "sparsify", "device": cfg.device, "d": data.shape[1], "latents": cfg.latents,
        "k": cfg.k, "batch_size": cfg.batch_size, "steps": cfg.steps,
        "vectors_per_s": timed * cfg.batch_size / elapsed if timed > 0 else None,
        "seconds_per_step": elapsed / timed if timed > 0 else None, "eval_fvu": fvu,
        "dead_fraction_eval": dead, "peak_device_gb": peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if cfg.out is not None:
        cfg.out.write_text(json.dumps(result, indent=1) + "\n")
    if cfg.save is not None:
        sae.save_to_disk(cfg.save)
    return result, sae


def main(argv=None) -> dict:
    parser = flags.make_parser("sparsify_topk.py", __doc__.split("\n\n")[0],
                               [flags.Group("run", (PeerRun,))])
    result, _ = run(flags.build(PeerRun, flags.parse(parser, argv)))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
