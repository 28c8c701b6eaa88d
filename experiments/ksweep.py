"""Train a k-sparse autoencoder for every k of a sweep in one vmapped run; write params,
metrics and figures.

    python -m experiments.ksweep                       # MNIST (or the offline sample), k = 5..100
    python -m experiments.ksweep --idx-dir /usr/share/datasets/fashion-mnist --out runs/fashion
"""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ksae_jax import cli, plotting
from ksae_jax.checkpoint import save_params, write_json
from ksae_jax.config import DEFAULT_KS, ModelConfig, SweepConfig
from ksae_jax.inference import Autoencoder

N_SHOW = 9  # images per reconstruction figure, as the original


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.ksweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=cli.int_value, nargs="*", default=list(DEFAULT_KS),
                   help="k values, all trained in one vmapped run (default 5 10 25 50 100)")
    p.add_argument("--epochs", type=cli.positive_int, default=9)
    p.add_argument("--batch-size", type=cli.positive_int, default=600)
    p.add_argument("--lr", type=cli.positive_float, default=1e-3)
    p.add_argument("--l1", type=cli.nonneg_float, default=1e-4,
                   help="lambda of the L1 activation penalty (0: pure k-sparse)")
    p.add_argument("--arch", choices=("conv", "mlp"), default="conv")
    p.add_argument("--hidden", type=cli.positive_int, default=None,
                   help="code width (default 256 conv, 1000 mlp)")
    p.add_argument("--tied", action="store_true", help="mlp: decoder = encoder transposed")
    p.add_argument("--loss", choices=("mse", "bce"), default="mse")
    cli.add_data_flags(p)
    p.add_argument("--seed", type=cli.int_value, default=1)
    cli.add_run_flags(p, default_out="runs/ksweep")
    return p.parse_args(argv)


def make_config(args) -> SweepConfig:
    try:
        return SweepConfig(
            model=ModelConfig(args.arch, args.hidden, args.tied, args.loss),
            ks=tuple(args.ks), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            l1=args.l1, seed=args.seed)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def write_figures(out: Path, ae: Autoencoder, x_train, x_test, history, dataset: str):
    ks = ae.ks
    for k in ks:
        for split, x in (("train", x_train), ("test", x_test)):
            fig = plotting.reconstructions(x[:N_SHOW] / 255.0, ae.reconstruct(x[:N_SHOW], k),
                                           f"{dataset} {split} images, k = {k}")
            plotting.save(fig, out / f"recon_k{k}_{split}.png")
        feats, _, _ = ae.decoder_features(x_test, k, n=100)
        plotting.save(plotting.feature_grid(feats, f"decoder features, k = {k} "
                                            "(100 most used units)"), out / f"features_k{k}.png")
    recons = {k: ae.reconstruct(x_test[:10], k) for k in ks}
    plotting.save(plotting.compare_ks(x_test[:10] / 255.0, recons, f"{dataset} test images"),
                  out / "compare_ks.png")
    plotting.save(plotting.loss_curves(ks, history["train_loss"], history["test_mse"], dataset),
                  out / "loss_curves.png")


def main(argv=None):
    args = parse_args(argv)
    cfg = make_config(args)
    out, ds = cli.prepare_run(args, cfg, default_out="runs/ksweep")
    print(f"dataset {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
          f"{cfg.model.arch} model, ks {list(cfg.ks)}, {cfg.epochs} epochs")
    source = str(args.idx_dir) if args.idx_dir else ds.name
    run_info = {"data": {"dataset": ds.name, "source": source, "n_train": len(ds.x_train)}}
    result = cli.train(cfg, ds, out, args, run_info)

    healthy = [i for i, k in enumerate(cfg.ks) if k not in result.diverged]
    final = [h[-1] for h in result.history["test_mse"]]
    metrics = {
        "ks": list(cfg.ks),
        "train_loss": result.history["train_loss"],
        "train_mse": result.history["train_mse"],
        "test_mse": {"per_epoch": result.history["test_mse"], "final": final},
        "diverged": {str(k): v for k, v in result.diverged.items()},
        "dataset": ds.name,
        "data_source": source,
        "n_train": int(len(ds.x_train)),
        "n_test": int(len(ds.x_test)),
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "config": cfg.to_dict(),
    }
    write_json(out / "metrics.json", metrics)
    if not healthy:
        raise cli.RunFailed("every model diverged: no params.pkl written")
    ks = tuple(cfg.ks[i] for i in healthy)  # diverged models are not written as results
    params = jax.tree.map(lambda a: a[np.asarray(healthy)], result.params)
    save_params(out / "params.pkl", config=cfg.to_dict(), ks=ks, params=params, metrics=metrics,
                extra={"dataset": ds.name})
    ae = Autoencoder(cfg, ks, params, metrics)
    history = {name: [result.history[name][i] for i in healthy] for name in ("train_loss", "test_mse")}
    write_figures(out, ae, ds.x_train, ds.x_test, history, ds.name)

    print(f"\n{'k':>5} {'train loss':>11} {'train MSE':>10} {'test MSE':>10}")
    for i, k in enumerate(cfg.ks):
        if k in result.diverged:
            w = result.diverged[k]
            print(f"{k:>5}  diverged at epoch {w['epoch']} step {w['step']} (not saved)")
            continue
        print(f"{k:>5} {result.history['train_loss'][i][-1]:>11.5f} "
              f"{result.history['train_mse'][i][-1]:>10.5f} {final[i]:>10.5f}")
    print(f"wall time {result.seconds:.1f} s ({result.compile_seconds:.1f} s compile + first step); "
          f"outputs in {out}")


if __name__ == "__main__":
    cli.run(main)
