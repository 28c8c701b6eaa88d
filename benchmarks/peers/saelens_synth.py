"""SAELens's own trainer on rows of a .npy file: one SAE (TopK, BatchTopK or Matryoshka
BatchTopK, at SAELens's defaults for that family), trained by `SAETrainer` as
SAELens's synthetic-data path (`sae_lens.synthetic.train_toy_sae`) configures it: Adam
(0.9, 0.999) at a constant lr, dead latents counted over 1,000 steps, its gradient clipping
at 1.0. The rows come in ksae_jax's order for the same file, seed and batch (its host
feeder's), so that both libraries see the same batches in the same order.

    python benchmarks/peers/saelens_synth.py --data train.npy --arch topk --k 16 \\
        --latents 4096 --steps 300 --batch-size 4096 --lr 3e-4 --out saelens_topk_k16

Writes OUT (SAE.save_inference_model: SAE.load_from_disk reads it) and OUT/timing.json.
Needs `pip install sae-lens` (torch included).
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig,
                           MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig,
                           TopKTrainingSAE, TopKTrainingSAEConfig)
from sae_lens.training.sae_trainer import SAETrainer

from ksae_jax.data.feed import ArrayRows, HostFeeder
from ksae_jax.models import registry


FAMILIES = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
            "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
            "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)}
# what a family's config needs beside d_in, d_sae and k (Matryoshka: ksae_jax's own default
# prefixes, read from its config, then the whole width)
EXTRA = {"matryoshka": lambda d, n: {
    "matryoshka_widths": [*registry.lookup("matryoshka").config(d, n).prefixes, n]}}


def make_sae(arch: str, d: int, latents: int, k: int):
    """SAELens's training SAE of one family, at its defaults."""
    sae, config = FAMILIES[arch]
    extra = EXTRA.get(arch, lambda d, n: {})(d, latents)
    return sae(config(d_in=d, d_sae=latents, k=k, **extra))


def batches(data: np.ndarray, batch_size: int, seed: int):
    """ksae_jax's host feeder's batches of data (its own iterator), as torch tensors."""
    feeder = HostFeeder(ArrayRows(data), batch_size, seed, put=lambda batch: batch)
    for batch in feeder.batches():
        yield torch.from_numpy(batch["x"])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--arch", default="topk", choices=list(FAMILIES))
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    data = np.load(a.data, mmap_mode="r")
    sae = make_sae(a.arch, data.shape[1], a.latents, a.k)
    cfg = SAETrainerConfig(
        total_training_samples=a.steps * a.batch_size, train_batch_size_samples=a.batch_size,
        lr=a.lr, lr_end=a.lr, lr_scheduler_name="constant", device="cpu",
        dead_feature_window=1000, feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=batches(data, a.batch_size, a.seed))
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(out)
    (out / "timing.json").write_text(json.dumps(
        {"train_seconds": seconds, "steps": a.steps, "seconds_per_step": seconds / a.steps}))


if __name__ == "__main__":
    main()
