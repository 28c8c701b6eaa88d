"""Real activations offline: train a small image classifier (a ReLU MLP 784-512-512-10, a few
CPU minutes) on an MNIST-format dataset and write its last 512-wide hidden layer's
activations for every training and test image, as .npy files a TopK SAE can train on.

    python -m experiments.activations --idx-dir /usr/share/datasets/fashion-mnist --out runs/acts
    python -m experiments.sae --data runs/acts/train.npy --eval-data runs/acts/test.npy \\
        --latents 8192 --ks 8 16 32 64
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ksae_jax import classify, cli
from ksae_jax.files import atomic_write, write_json


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.activations", description=__doc__.split("\n\n")[0])
    cli.add_data_flags(p)
    p.add_argument("--width", type=cli.positive_int, default=512, help="hidden layer width")
    p.add_argument("--epochs", type=cli.positive_int, default=5)
    p.add_argument("--batch-size", type=cli.positive_int, default=128)
    p.add_argument("--lr", type=cli.positive_float, default=1e-3)
    p.add_argument("--seed", type=cli.int_value, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/activations)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(resume=None)
    return p.parse_args(argv)


def save_npy(path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def main(argv=None):
    args = parse_args(argv)
    ds = cli.load_data(args)
    out = cli.output_dir(args, default="runs/activations")
    widths = (784, args.width, args.width, 10)
    print(f"dataset {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
          f"MLP {'-'.join(map(str, widths))}, {args.epochs} epochs")
    layers = classify.train_mlp(ds.x_train, ds.y_train, widths, epochs=args.epochs, lr=args.lr,
                                batch_size=args.batch_size, seed=args.seed,
                                progress=not args.no_progress)
    info = {"dataset": ds.name, "source": str(args.idx_dir) if args.idx_dir else ds.name,
            "widths": list(widths), "epochs": args.epochs, "layer": "last hidden (ReLU)",
            "rows": "train.npy: the training images in order; test.npy: the test images"}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        acts, pred = classify.mlp_activations(layers, x)
        save_npy(out / f"{split}.npy", acts.astype(np.float32))
        save_npy(out / f"{split}_labels.npy", y.astype(np.int64))
        info[f"{split}_error_pct"] = float(100 * np.mean(pred != y))
        info[f"{split}_shape"] = list(acts.shape)
        info[f"{split}_active_frac"] = float(np.mean(acts > 0))
    write_json(out / "info.json", info)
    print(f"classifier error: {info['train_error_pct']:.2f}% train, {info['test_error_pct']:.2f}% test; "
          f"{100 * info['train_active_frac']:.1f}% of activations non-zero")
    print(f"wrote {out / 'train.npy'} {tuple(info['train_shape'])} and {out / 'test.npy'} "
          f"{tuple(info['test_shape'])}")


if __name__ == "__main__":
    cli.run(main)
