"""Train a k-sparse autoencoder for every k of a sweep in one compiled run; write params,
metrics and figures.

    python -m experiments.ksweep                       # MNIST (or the offline sample), k = 5..100
    python -m experiments.ksweep --idx-dir /usr/share/datasets/fashion-mnist --out runs/fashion
    python -m experiments.ksweep --arch mlp --recipe paper   # Makhzani & Frey's own training

Budget: the original's 9 epochs of batch 600 (900 steps on 60,000 images); on the offline
sample (4,000 images, where 9 epochs would be 63 steps) 700 steps of batch 200 instead, which
reach the original's quality in a few minutes on 2 CPU cores. --steps or --epochs and
--batch-size override both.
"""
from __future__ import annotations

from ksae_jax import cli, image_recipes, plotting, runner
from ksae_jax.config import DEFAULT_EPOCHS, DEFAULT_KS, ImageModel, SweepConfig
from ksae_jax.data.images import SAMPLE
from ksae_jax.files import write_json

N_SHOW = 9  # images per reconstruction figure, as the original
ORIGINAL = {"epochs": DEFAULT_EPOCHS, "batch_size": 600}
SAMPLE_BUDGET = {"steps": 700, "batch_size": 200}
DEFAULT_RECIPE = {"optimizer": "adam", "lr": 1e-3, "l1": 1e-4, "loss": "mse", "tied": False}


def default_budget(sample: bool, steps=None, epochs=None, batch_size=None) -> dict:
    """The budget flags with defaults filled in: the original's 9 epochs of batch 600, or on
    the offline sample 700 steps of batch 200 (9 of its epochs would be 63 steps)."""
    base = SAMPLE_BUDGET if sample else ORIGINAL
    if steps is None and epochs is None:
        steps, epochs = base.get("steps"), base.get("epochs")
    return {"steps": steps, "epochs": epochs, "batch_size": batch_size or base["batch_size"]}


class KSweep(runner.Experiment):
    name = "ksweep"
    doc = __doc__

    def add_flags(self, p):
        p.add_argument("--ks", type=cli.int_value, nargs="*", default=list(DEFAULT_KS),
                       help="k values, all trained in one compiled run (default 5 10 25 50 100)")
        cli.add_budget_flags(p, batch_size=None)
        p.add_argument("--lr", type=cli.positive_float, default=None,
                       help="learning rate (default 1e-3; paper recipe 0.01)")
        p.add_argument("--l1", type=cli.nonneg_float, default=None,
                       help="lambda of the L1 activation penalty (default 1e-4; 0: pure "
                            "k-sparse, as the paper recipe)")
        p.add_argument("--arch", choices=("conv", "mlp"), default="conv")
        p.add_argument("--hidden", type=cli.positive_int, default=None,
                       help="code width (default 256 conv, 1000 mlp)")
        p.add_argument("--tied", action="store_const", const=True, default=None,
                       help="mlp: decoder = encoder transposed (as the paper recipe)")
        p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="compute dtype of the matmuls and convolutions (bfloat16: f32 "
                            "accumulation, f32 weights and Adam)")
        image_recipes.add_flags(p)
        cli.add_auxk_flags(p, aux_coef=0.0)
        cli.add_data_flags(p)
        p.add_argument("--seed", type=cli.int_value, default=1)
        cli.add_run_flags(p, default_out=self.default_out)

    def parse(self, argv):
        return image_recipes.fill(self.parser().parse_args(argv), DEFAULT_RECIPE)

    def check_flags(self, args):
        cli.check_data_flags(args)

    def describe(self, args):
        return {"sample": args.idx_dir is None and args.dataset == SAMPLE}

    def config(self, args, spec):
        model = ImageModel(args.arch, args.hidden, args.tied, args.loss, args.l1, args.dtype,
                           args.activation, args.init_std)
        return SweepConfig(
            model=model, ks=tuple(args.ks), lr=args.lr, seed=args.seed, batching=args.batching,
            optimizer=args.optimizer, momentum=args.momentum,
            eval_every=args.eval_every, aux_coef=args.aux_coef, aux_k=args.aux_k,
            dead_tokens=args.dead_tokens,
            **default_budget(spec["sample"], args.steps, args.epochs, args.batch_size))

    def load(self, args):
        ds = cli.load_data(args)
        source = str(args.idx_dir) if args.idx_dir else ds.name
        info = {"data": {"dataset": ds.name, "source": source, "n_train": len(ds.x_train)}}
        return runner.Data(ds.x_train, ds.x_test, {"sample": ds.name == SAMPLE}, len(ds.x_train),
                           info, ds.name, ds)

    def summary(self, run_cfg, data, training):
        ds = data.extra
        return (f"dataset {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
                f"{run_cfg.model.arch} model, ks {list(run_cfg.ks)}")

    def report(self, run):
        cfg, result, ds = run.cfg, run.result, run.data.extra
        h = result.history
        metrics = {
            "ks": list(cfg.ks), **run.plan, "step": h["step"],
            "train_loss": h["train_loss"], "train_mse": h["train_rec"],
            "test_mse": {"per_eval": h["eval_mse"], "final": [m[-1] for m in h["eval_mse"]]},
            "dead_units_frac": [m[-1] for m in h["eval_dead_frac"]],
            "diverged": {str(k): v for k, v in result.diverged.items()},
            "dataset": ds.name, "data_source": run.data.info["data"]["source"],
            "n_train": len(ds.x_train), "n_test": len(ds.x_test),
            "seconds": result.seconds, "compile_seconds": result.compile_seconds,
            "recipe": image_recipes.record(run.args), "config": cfg.to_dict(),
        }
        write_json(run.out / "metrics.json", metrics)
        runner.save(run, metrics, extra={"dataset": ds.name})
        write_figures(run, result.models(metrics))
        print_table(cfg, result, metrics)
        print(f"wall time {result.seconds:.1f} s ({result.compile_seconds:.1f} s compile + first "
              f"step); outputs in {run.out}")


def write_figures(run, ae) -> None:
    ds, h, out = run.data.extra, run.result.history, run.out
    for k in ae.ks:
        for split, x in (("train", ds.x_train), ("test", ds.x_test)):
            fig = plotting.reconstructions(x[:N_SHOW] / 255.0, ae.reconstruct(x[:N_SHOW], k),
                                           f"{ds.name} {split} images, k = {k}")
            plotting.save(fig, out / f"recon_k{k}_{split}.png")
        feats, units, counts = ae.decoder_features(ds.x_test, k, n=100)
        alive = int((counts > 0).sum())
        shown = feats[counts[units] > 0]  # units that never fire would be blank panels
        shown = shown if len(shown) else feats[:1]
        plotting.save(plotting.feature_grid(
            shown, f"decoder features, k = {k}: {alive} of {len(counts)} units fire on the test "
                   f"set; the {len(shown)} most used"), out / f"features_k{k}.png")
    recons = {k: ae.reconstruct(ds.x_test[:10], k) for k in ae.ks}
    plotting.save(plotting.compare_ks(ds.x_test[:10] / 255.0, recons, f"{ds.name} test images"),
                  out / "compare_ks.png")
    keep = [run.cfg.ks.index(k) for k in ae.ks]
    plotting.save(plotting.loss_curves(ae.ks, h["step"], [h["train_loss"][i] for i in keep],
                                       [h["eval_mse"][i] for i in keep], ds.name),
                  out / "loss_curves.png")


def print_table(cfg: SweepConfig, result, metrics: dict) -> None:
    print(f"\n{'k':>5} {'train loss':>11} {'train MSE':>10} {'test MSE':>10} {'dead units':>11}")
    for i, k in enumerate(cfg.ks):
        if k in result.diverged:
            w = result.diverged[k]
            print(f"{k:>5}  diverged at step {w['step']} (epoch {w['epoch']}; not saved)")
            continue
        print(f"{k:>5} {metrics['train_loss'][i][-1]:>11.5f} {metrics['train_mse'][i][-1]:>10.5f} "
              f"{metrics['test_mse']['final'][i]:>10.5f} {100 * metrics['dead_units_frac'][i]:>10.1f}%")


def main(argv=None) -> runner.Run:
    return runner.execute(KSweep(), argv)


if __name__ == "__main__":
    runner.main(KSweep())
