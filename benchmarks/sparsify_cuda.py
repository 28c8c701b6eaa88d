"""sparsify's SparseCoder trained on a GPU (with its Triton kernels) the way its Trainer
trains one, for benchmarks/gpu.sh: the same flags and JSON line as shared/peers/sparsify_topk.py
(b_dec = mean of the first batch, unit decoder rows before every forward, the parallel gradient
removed before every Adam step, tokens-since-fired counters for AuxK), with the data held on
the device and the timings synchronised. `--device cpu` runs it anywhere (the dry run).

    python benchmarks/sparsify_cuda.py --data acts.npy --latents 16384 --k 32 --steps 30
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
import types

import numpy as np
import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--eval-n", type=int, default=8192)
    p.add_argument("--latents", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(latents / 2**14)")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=10_000_000)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


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


def train(args, sae, data: torch.Tensor):
    """args.steps of sparsify's trainer's step on shuffled batches; seconds of the timed ones."""
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr or 2e-4 / (args.latents / 2 ** 14) ** 0.5)
    since_fired = torch.zeros(args.latents, dtype=torch.long, device=data.device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    order, pos, bs, start = torch.randperm(len(data), generator=gen), 0, args.batch_size, None
    for step in range(args.steps):
        if step == args.warmup:
            sync(args.device)
            start = time.perf_counter()
        if pos + bs > len(data):
            order, pos = torch.randperm(len(data), generator=gen), 0
        x, pos = data[order[pos:pos + bs].to(data.device)], pos + bs
        if step == 0:
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since_fired > args.dead_tokens if args.auxk_alpha > 0 else None)
        (out.fvu + args.auxk_alpha * out.auxk_loss).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            since_fired += bs
            since_fired[out.latent_indices.flatten()] = 0
    sync(args.device)
    return time.perf_counter() - start if start else float("nan")


def main(argv=None):
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    SparseCoder, SparseCoderConfig = sparse_coder()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    arr = np.load(args.data, mmap_mode="r")
    data = torch.from_numpy(np.array(arr[:-args.eval_n], np.float32)).to(args.device)
    held = torch.from_numpy(np.array(arr[-args.eval_n:], np.float32)).to(args.device)
    sae = SparseCoder(data.shape[1], SparseCoderConfig(num_latents=args.latents, k=args.k),
                      device=args.device)
    elapsed, timed = train(args, sae, data), args.steps - args.warmup
    sae.set_decoder_norm_to_unit_norm()
    fvu, dead = held_out(sae, held)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else None
    print(json.dumps({
        "peer": "sparsify", "device": args.device, "d": data.shape[1], "latents": args.latents,
        "k": args.k, "batch_size": args.batch_size, "steps": args.steps,
        "vectors_per_s": timed * args.batch_size / elapsed if timed > 0 else None,
        "seconds_per_step": elapsed / timed if timed > 0 else None, "eval_fvu": fvu,
        "dead_fraction_eval": dead, "peak_device_gb": peak,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main()
