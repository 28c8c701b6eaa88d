"""The original PyTorch project's training loop, the peer of the image benchmark: its conv
k-sparse autoencoder (conv 16/32/64 -> Linear 576->256 -> top-k -> the mirrored decoder, ReLU
after every layer, the output's too), MSE + 1e-4 * the mean |activation| of its eight
activations, Adam 1e-3, batch 600, torch.manual_seed(1), a shuffled DataLoader, one k per
model, trained one k after another; every epoch it reports the mean train loss and evaluates
the test set (here the true mean test MSE, where the original printed a miscomputed one).

    python benchmarks/peers/original.py --idx-dir /usr/share/datasets/fashion-mnist --epochs 1

Prints a line per k ("k=K ... time=Ts") and, last, one JSON line: n_train, total_s (every k,
test evaluation included) and test_mse per k. Needs `pip install torch==2.13.0`.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ksae_jax import flags  # noqa: E402
from ksae_jax.data.images import load_idx_dir  # noqa: E402


@dataclasses.dataclass(frozen=True)
class OriginalRun:
    """The original's training, one model per k."""

    idx_dir: Path
    """The four MNIST-format IDX files."""
    epochs: int = 9
    """Passes over the training images, per k."""
    ks: tuple[int, ...] = (5, 10, 25, 50, 100)
    """One model per k, one after another."""
    limit: int | None = None
    """Use only the first N training images."""
    threads: int = 0
    """torch's threads (0: its default)."""
    device: str = "cpu"
    """Where it trains (the original only ever ran on the CPU)."""


class KSparseAE(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.enc = nn.ModuleList([nn.Conv2d(1, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1),
                                  nn.Conv2d(32, 64, 5, 2, 1)])
        self.enc_fc, self.dec_fc = nn.Linear(576, 256), nn.Linear(256, 576)
        self.dec = nn.ModuleList([nn.ConvTranspose2d(64, 32, 5, 2, 1),
                                  nn.ConvTranspose2d(32, 16, 3, 2, 1, output_padding=1),
                                  nn.ConvTranspose2d(16, 1, 3, 2, 1, output_padding=1)])

    def forward(self, x):
        acts, h = [], x
        for conv in self.enc:
            h = torch.relu(conv(h))
            acts.append(h)
        z = torch.relu(self.enc_fc(h.flatten(1)))
        values, indices = torch.topk(z, self.k, dim=1)
        z = torch.zeros_like(z).scatter(1, indices, values)
        h = torch.relu(self.dec_fc(z))
        acts += [z, h]
        h = h.view(-1, 64, 3, 3)
        for conv in self.dec:
            h = torch.relu(conv(h))
            acts.append(h)
        return h, acts


def loss_fn(recon, x, acts, l1: float = 1e-4):
    return nn.functional.mse_loss(recon, x) + l1 * sum(a.abs().mean() for a in acts)


def train_one(k: int, loader, test: torch.Tensor, epochs: int, device: str) -> float:
    """The original's loop for one k; returns the final mean test MSE."""
    model = KSparseAE(k).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        total = 0.0
        for (x,) in loader:
            x = x.to(device)
            recon, acts = model(x)
            loss = loss_fn(recon, x, acts)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        mse = test_mse(model, test, device)
        print(f"k={k} epoch {epoch + 1}: train loss {total / len(loader):.5f}, test MSE {mse:.5f}")
    return mse


@torch.no_grad()
def test_mse(model, test: torch.Tensor, device: str, batch: int = 600) -> float:
    sse = sum(float(((model(x.to(device))[0] - x.to(device)) ** 2).sum())
              for x in test.split(batch))
    return sse / test.numel()


def main(argv=None) -> dict:
    parser = flags.make_parser("original.py", __doc__.split("\n\n")[0],
                               [flags.Group("run", (OriginalRun,))])
    cfg = flags.build(OriginalRun, flags.parse(parser, argv))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(1)
    ds = load_idx_dir(cfg.idx_dir).limit_train(cfg.limit)
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32)[:, None] / 255)  # ToTensor
    train = torch.utils.data.TensorDataset(as_tensor(ds.x_train))
    loader = torch.utils.data.DataLoader(train, batch_size=600, shuffle=True)
    test, results, t0 = as_tensor(ds.x_test), [], time.perf_counter()
    for k in cfg.ks:
        t = time.perf_counter()
        results.append(train_one(k, loader, test, cfg.epochs, cfg.device))
        print(f"k={k} done: test MSE {results[-1]:.5f}, time={time.perf_counter() - t:.2f}s")
    out = {"n_train": len(ds.x_train), "total_s": time.perf_counter() - t0, "test_mse": results,
           "ks": list(cfg.ks)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
