"""Makhzani & Frey's result: k-sparse features vs raw pixels under a linear classifier.

    python -m experiments.paper_table --idx-dir /usr/share/datasets/fashion-mnist --finetune

Trains tied 784-1000 k-sparse autoencoders (linear units, k scheduled down from k_start)
for every k in one vmapped run, then softmax classifiers on raw pixels and on each
model's alpha*k-sparse codes (optionally fine-tuned with the encoder), and writes
table.md, table.json, features.png and the autoencoders' params.pkl (plus the training
checkpoint.pkl) to --out.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import classify, cli, plotting
from ksae_jax.checkpoint import save_params, write_bytes, write_json
from ksae_jax.config import ModelConfig, SweepConfig
from ksae_jax.inference import Autoencoder

PAPER_MNIST = {"raw pixels": 7.2, "k = 10": 2.1, "k = 25": 1.35, "k = 40": 1.5,
               "k = 25 fine-tuned": 1.1}  # test error %, as recalled from the paper


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.paper_table", description=__doc__.split("\n\n")[0])
    cli.add_data_flags(p)
    p.add_argument("--ks", type=cli.int_value, nargs="*", default=[10, 25, 40, 70])
    cli.add_budget_flags(p, batch_size=100)
    p.add_argument("--k-start", type=cli.positive_int, default=None,
                   help="k at the start of training, lowered linearly to each k over the first "
                        "half of the budget (default max(100, largest k))")
    p.add_argument("--alpha", type=cli.positive_float, default=3.0,
                   help="classification features keep alpha*k units (default 3)")
    p.add_argument("--hidden", type=cli.positive_int, default=1000)
    p.add_argument("--lr", type=cli.positive_float, default=1e-3)
    p.add_argument("--cls-epochs", type=cli.positive_int, default=30, help="classifier epochs")
    p.add_argument("--finetune", action="store_true", help="also fine-tune encoder + classifier")
    p.add_argument("--ft-epochs", type=cli.positive_int, default=10)
    p.add_argument("--ft-lr", type=cli.positive_float, default=1e-4)
    p.add_argument("--seed", type=cli.int_value, default=1)
    cli.add_run_flags(p, default_out="runs/paper_table")
    return p.parse_args(argv)


AE_EPOCHS = 30  # autoencoder budget when neither --steps nor --epochs is given


def make_config(args) -> SweepConfig:
    ks = tuple(args.ks)
    k_start = args.k_start or min(args.hidden, max((100,) + ks))
    epochs = args.epochs or (None if args.steps else AE_EPOCHS)
    return cli.make_config(SweepConfig, model=ModelConfig("mlp", hidden=args.hidden, tied=True),
                           ks=ks, epochs=epochs, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, l1=0.0, seed=args.seed, k_start=k_start, k_anneal_frac=0.5,
                           batching=args.batching, eval_every=args.eval_every)


def markdown(table: dict) -> str:
    lines = [f"# k-sparse features under a linear classifier: {table['dataset']}", "",
             f"{table['n_train']} training / {table['n_test']} test images. Tied "
             f"784-{table['config']['model']['hidden']} k-sparse autoencoders (linear units, "
             f"pure k-sparse), {table['budget']}, k scheduled from "
             f"{table['config']['k_start']}; classification features keep alpha*k units "
             f"(alpha = {table['alpha']}); softmax classifier {table['cls_epochs']} epochs.", "",
             "| features | test error % | dead units % | test recon MSE |",
             "|---|---:|---:|---:|"]
    for r in table["rows"]:
        dead = "" if r["dead_units_pct"] is None else f"{r['dead_units_pct']:.1f}"
        mse = "" if r["recon_mse"] is None else f"{r['recon_mse']:.4f}"
        lines.append(f"| {r['name']} | {r['test_error_pct']:.2f} | {dead} | {mse} |")
    lines += ["", f"Wall time {table['seconds'] / 60:.1f} min. Dead units: never among the top k "
              "on the training set."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.distributed:
        raise cli.UsageError("--distributed: the paper table's classifiers run in one process "
                             "(its autoencoders can still use --mesh over local devices)")
    cfg = make_config(args)
    ds = cli.load_data(args)
    cli.check_batch_size(cfg, len(ds.x_train))
    out = cli.output_dir(args, default="runs/paper_table")
    t0 = time.perf_counter()
    progress = not args.no_progress
    print(f"dataset {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test; ks {list(cfg.ks)}")

    run_info = {"data": {"dataset": ds.name, "n_train": len(ds.x_train)}}
    mesh = cli.device_mesh(args, cfg)
    budget = cli.announce(cfg, len(ds.x_train), mesh)
    result = cli.train(cfg, ds.x_train, ds.x_test, out, args, run_info, mesh=mesh)
    if result.diverged:
        raise cli.RunFailed(f"autoencoders diverged: {result.diverged}; try a smaller --lr")
    ae = Autoencoder(cfg, cfg.ks, result.params)
    n_active = [min(int(round(args.alpha * k)), cfg.model.hidden) for k in cfg.ks]
    common = dict(epochs=args.cls_epochs, lr=1e-3, batch_size=100, seed=cfg.seed, progress=progress)

    raw = classify.fit({"cls": classify.init_linear(784, 1)}, ds.x_train, ds.y_train, [0],
                       cfg=None, max_k=1, desc="raw-pixel classifier", **common)
    raw_err = classify.error_rate(raw, ds.x_test, ds.y_test, [0], cfg=None, max_k=1)[0]

    state = {"cls": classify.init_linear(cfg.model.hidden, len(cfg.ks)),
             "enc": jax.tree.map(jnp.asarray, result.params)}
    fkw = dict(cfg=cfg.model, max_k=max(n_active))
    state = classify.fit(state, ds.x_train, ds.y_train, n_active, desc="feature classifiers",
                         **fkw, **common)
    feat_err = classify.error_rate(state, ds.x_test, ds.y_test, n_active, **fkw)

    usage = [ae.unit_usage(ds.x_train, k) for k in cfg.ks]
    dead = [100.0 * float(np.mean(u == 0)) for u in usage]
    mse = [h[-1] for h in result.history["eval_mse"]]
    rows = [{"name": "raw pixels", "test_error_pct": float(raw_err), "dead_units_pct": None,
             "recon_mse": None}]
    rows += [{"name": f"k = {k}", "test_error_pct": float(e), "dead_units_pct": d, "recon_mse": m}
             for k, e, d, m in zip(cfg.ks, feat_err, dead, mse)]
    if args.finetune:
        tuned = classify.fit(state, ds.x_train, ds.y_train, n_active, finetune=True,
                             epochs=args.ft_epochs, lr=args.ft_lr, batch_size=100, seed=cfg.seed,
                             progress=progress, desc="fine-tuning", **fkw)
        ft_err = classify.error_rate(tuned, ds.x_test, ds.y_test, n_active, **fkw)
        rows += [{"name": f"k = {k} fine-tuned", "test_error_pct": float(e), "dead_units_pct": None,
                  "recon_mse": None} for k, e in zip(cfg.ks, ft_err)]

    feats = {k: ae.decoder_features(ds.x_test, k, n=100)[0] for k in cfg.ks}
    plotting.save(plotting.feature_panels(feats, f"{ds.name}: 100 most used decoder features per k"),
                  out / "features.png")
    table = {"dataset": ds.name, "n_train": len(ds.x_train), "n_test": len(ds.x_test),
             "config": cfg.to_dict(), "budget": f"{budget['steps']} steps ({budget['epochs']:.3g} epochs)",
             "alpha": args.alpha, "n_active": n_active,
             "cls_epochs": args.cls_epochs, "finetune": args.finetune,
             "ft_epochs": args.ft_epochs if args.finetune else None, "rows": rows,
             "seconds": time.perf_counter() - t0}
    if ds.name == "mnist":
        table["paper_mnist_error_pct"] = PAPER_MNIST
    write_json(out / "table.json", table)
    write_bytes(out / "table.md", markdown(table).encode())
    save_params(out / "params.pkl", config=cfg.to_dict(), ks=cfg.ks, params=result.params,
                metrics={"test_mse": mse, "table": rows}, extra={"dataset": ds.name})
    print("\n" + markdown(table))
    print(f"outputs in {out}")


if __name__ == "__main__":
    cli.run(main)
