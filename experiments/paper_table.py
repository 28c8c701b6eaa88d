"""Makhzani & Frey's result: k-sparse features vs raw pixels under a linear classifier.

    python -m experiments.paper_table --idx-dir /usr/share/datasets/fashion-mnist --finetune
    python -m experiments.paper_table --quick          # the trend in a few minutes

    python -m experiments.paper_table --idx-dir ../shared/data/mnist --recipe paper \
        --epochs 100 --curve-epochs 10 30      # the authors' training, with a learning curve

Protocol (the paper's): --val images (default 10,000) are drawn from the training set as a
validation split; tied 784-1000 k-sparse autoencoders train on the rest, every k in one
compiled run, with the default recipe (Adam, mean-per-pixel MSE, linear units, k scheduled
down from k_start over the first half) or --recipe paper (the authors' code, see
ksae_jax.image_recipes); softmax classifiers train on raw pixels and on each model's
alpha*k-sparse codes (and, with --finetune, with the encoder), each keeping the epoch with
the lowest validation error. --curve-epochs also trains the feature classifiers on the
autoencoders as they were after those epochs (a learning curve: error_vs_epochs.png).
Writes table.md, table.json, features.png and the autoencoders' params.pkl to --out.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import classify, cli, image_recipes, models, plotting, runner
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.files import write_bytes, write_json

PAPER_MNIST = {"raw pixels": 7.2, "k = 10": 2.1, "k = 25": 1.35, "k = 40": 1.5,
               "k = 25 fine-tuned": 1.1}  # test error %, as recalled from the paper
AE_EPOCHS = 30        # autoencoder budget when neither --steps nor --epochs is given
QUICK = {"train_limit": 20_000, "epochs": 5, "cls_epochs": 5, "ft_epochs": 2}
DEFAULT_RECIPE = {"optimizer": "adam", "lr": 1e-3, "batch_size": 100, "loss": "mse",
                  "activation": "linear", "k_anneal_frac": 0.5}


def split_data(args, ds):
    """(training images and labels, validation images and labels) from the training set."""
    n_val = args.val or min(10_000, len(ds.x_train) // 6)
    try:
        rest, x_val, y_val = ds.hold_out(n_val, seed=args.seed)
    except ValueError as e:
        raise cli.UsageError(f"--val: {e}") from None
    return rest, (x_val, y_val)


class PaperTable(runner.Experiment):
    name = "paper_table"
    doc = __doc__

    def add_flags(self, p):
        cli.add_data_flags(p)
        p.add_argument("--ks", type=cli.int_value, nargs="*", default=[10, 25, 40, 70])
        cli.add_budget_flags(p, batch_size=None)
        p.add_argument("--curve-epochs", type=cli.positive_int, nargs="*", default=[],
                       help="also classify with the autoencoders as they were after these "
                            "epochs (each below the budget, which must be --epochs)")
        p.add_argument("--val", type=cli.positive_int, default=None,
                       help="validation images drawn from the training set (default 10,000, at "
                            "most a sixth of it)")
        p.add_argument("--k-start", type=cli.positive_int, default=None,
                       help="k at the start of training, lowered linearly to each k over the "
                            "first half of the budget (default max(100, largest k); the "
                            "paper recipe keeps k fixed)")
        p.add_argument("--k-anneal-frac", type=cli.nonneg_float, default=None,
                       help="fraction of the budget over which k falls from --k-start (default "
                            "0.5; paper recipe 0)")
        cli.add_auxk_flags(p, aux_coef=0.0)
        p.add_argument("--alpha", type=cli.positive_float, default=3.0,
                       help="classification features keep alpha*k units (default 3)")
        p.add_argument("--hidden", type=cli.positive_int, default=1000)
        p.add_argument("--lr", type=cli.positive_float, default=None,
                       help="learning rate (default 1e-3; paper recipe 0.01)")
        image_recipes.add_flags(p)
        p.add_argument("--cls-epochs", type=cli.positive_int, default=30,
                       help="classifier epochs (the best on validation is kept)")
        p.add_argument("--finetune", action="store_true", help="also fine-tune encoder + classifier")
        p.add_argument("--ft-epochs", type=cli.positive_int, default=10)
        p.add_argument("--ft-lr", type=cli.positive_float, default=1e-4)
        p.add_argument("--quick", action="store_true",
                       help="the trend in minutes: 20,000 images, 5 autoencoder and 5 classifier epochs")
        p.add_argument("--seed", type=cli.int_value, default=1)
        cli.add_run_flags(p, default_out=self.default_out)

    def parse(self, argv):
        p = self.parser()
        args = p.parse_args(argv)
        args.t0 = time.perf_counter()
        if args.quick:
            for name, value in QUICK.items():
                if getattr(args, name) in (None, p.get_default(name)):
                    setattr(args, name, value)
        return image_recipes.fill(args, DEFAULT_RECIPE)

    def check_flags(self, args):
        if args.distributed:
            raise cli.UsageError("--distributed: the paper table's classifiers run in one process "
                                 "(its autoencoders can still use --mesh over local devices)")
        cli.check_data_flags(args)
        if args.k_start is not None and args.k_anneal_frac == 0:
            raise cli.UsageError("--k-start schedules k: give --k-anneal-frac > 0 too (the "
                                 "paper recipe keeps k fixed)")
        if args.curve_epochs and (args.epochs is None or max(args.curve_epochs) >= args.epochs):
            raise cli.UsageError("--curve-epochs: each must lie below --epochs (the budget)")
        if args.loss == "bce":
            raise cli.UsageError("--loss bce: the paper table's models have linear outputs")

    def config(self, args, spec):
        ks = tuple(args.ks)
        schedule = args.k_anneal_frac > 0
        k_start = (args.k_start or min(args.hidden, max((100,) + ks))) if schedule else None
        epochs = args.epochs or (None if args.steps else AE_EPOCHS)
        model = ImageModel("mlp", hidden=args.hidden, tied=True, loss=args.loss, l1=0.0,
                           activation=args.activation, init_std=args.init_std)
        return SweepConfig(model=model, ks=ks, epochs=epochs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           optimizer=args.optimizer, momentum=args.momentum, k_start=k_start,
                           k_anneal_frac=args.k_anneal_frac if schedule else 0.0,
                           aux_coef=args.aux_coef, aux_k=args.aux_k, dead_tokens=args.dead_tokens,
                           batching=args.batching, eval_every=_eval_every(args, spec))

    def on_eval(self, args, training):
        per_epoch, wanted = training.budget.steps_per_epoch, set(args.curve_epochs)
        missing = sorted(e for e in wanted if e * per_epoch not in training.budget.segment_ends(0))
        if missing:
            raise cli.UsageError(f"--curve-epochs {missing}: not evaluation points of "
                                 f"--eval-every {training.budget.eval_every}")
        args.snapshots = {}

        def keep(step, params):
            if step % per_epoch == 0 and step // per_epoch in wanted:
                args.snapshots[step // per_epoch] = jax.tree.map(np.asarray, params)
        return keep

    def load(self, args):
        ds, val = split_data(args, cli.load_data(args))
        info = {"data": {"dataset": ds.name, "n_train": len(ds.x_train), "n_val": len(val[0])}}
        spec = {"n_train": len(ds.x_train)} if args.curve_epochs else {}
        return runner.Data(ds.x_train, val[0], spec, len(ds.x_train), info, ds.name, (ds, val))

    def summary(self, run_cfg, data, training):
        ds, val = data.extra
        return (f"dataset {ds.name}: {len(ds.x_train)} train / {len(val[0])} validation / "
                f"{len(ds.x_test)} test; ks {list(run_cfg.ks)}")

    def report(self, run):
        args, cfg, result = run.args, run.cfg, run.result
        (ds, val), out = run.data.extra, run.out
        if result.diverged:
            raise cli.RunFailed(f"autoencoders diverged: {result.diverged}; try a smaller --lr")
        progress = not args.no_progress
        rows, choices = classifier_rows(args, cfg, ds, val, result.params, progress)
        ae = result.models()
        test_mse = evaluate(cfg, jax.tree.map(jnp.asarray, result.params),
                            EvalSet(ArrayRows(ds.x_test, 1 / 255))).mse
        dead = dead_units_pct(ae, ds.x_train)
        for i, k in enumerate(cfg.ks):
            rows[1 + i].update(dead_units_pct=dead[i], recon_mse=float(test_mse[i]))
        curve = learning_curve(args, cfg, ds, val, getattr(args, "snapshots", {}), rows,
                               run.plan["epochs"], progress)
        feats = {k: ae.decoder_features(ds.x_test, k, n=100)[0] for k in cfg.ks}
        plotting.save(plotting.feature_panels(feats, f"{ds.name}: 100 most used decoder features per k"),
                      out / "features.png")
        table = {"dataset": ds.name, "n_train": len(ds.x_train), "n_val": len(val[0]),
                 "n_test": len(ds.x_test), "config": cfg.to_dict(),
                 "budget": f"{run.plan['steps']} steps ({run.plan['epochs']:.3g} epochs)",
                 "alpha": args.alpha, "cls_epochs": args.cls_epochs, "finetune": args.finetune,
                 "ft_epochs": args.ft_epochs if args.finetune else None, "choices": choices,
                 "quick": args.quick, "recipe": image_recipes.record(args), "rows": rows,
                 "curve": curve, "seconds": time.perf_counter() - args.t0}
        if ds.name == "mnist":
            table["paper_mnist_error_pct"] = PAPER_MNIST
        write_json(out / "table.json", table)
        write_bytes(out / "table.md", markdown(table).encode())
        if len(curve["epochs"]) > 1:
            plotting.save(plotting.error_curves({args.recipe: curve}, ds.name, paper_by_k(ds.name)),
                          out / "error_vs_epochs.png")
        runner.save(run, {"test_mse": test_mse.tolist(), "table": rows}, extra={"dataset": ds.name})
        print("\n" + markdown(table))
        print(f"outputs in {out}")


def paper_by_k(dataset: str) -> dict | None:
    """{k: the paper's test error %} of the plain k rows (MNIST only)."""
    if dataset != "mnist":
        return None
    return {int(n[4:]): v for n, v in PAPER_MNIST.items() if n[4:].isdigit()}


def _eval_every(args, spec: dict) -> int | None:
    """--eval-every, or with --curve-epochs every gcd of the curve's epochs and the budget
    (in steps, once the training rows are counted)."""
    if not args.curve_epochs or args.eval_every or "n_train" not in spec:
        return args.eval_every
    return math.gcd(*args.curve_epochs, args.epochs) * -(-spec["n_train"] // args.batch_size)


def dead_units_pct(ae, images) -> list[float]:
    """Per k, the % of code units never among the top k (and nonzero) on the images."""
    return [100.0 * float(np.mean(ae.unit_usage(images, k) == 0)) for k in ae.ks]


def learning_curve(args, cfg, ds, val, snapshots: dict, rows: list, epochs: float,
                   progress: bool) -> dict:
    """Per epoch of --curve-epochs (and the budget's, from the table's rows), the feature
    classifiers' validation and test error % and the dead units % of every k."""
    final = {"val_error_pct": [r["val_error_pct"] for r in rows[1:1 + len(cfg.ks)]],
             "test_error_pct": [r["test_error_pct"] for r in rows[1:1 + len(cfg.ks)]],
             "dead_units_pct": [r["dead_units_pct"] for r in rows[1:1 + len(cfg.ks)]]}
    points = {}
    for epoch in sorted(snapshots):
        _, choice, test = feature_classifiers(args, cfg, ds, val, snapshots[epoch], progress,
                                              desc=f"classifiers at epoch {epoch}")
        ae = models.loaded(cfg, cfg.ks, snapshots[epoch])
        points[epoch] = {"val_error_pct": [float(v) for v in choice["val_error_pct"]],
                         "test_error_pct": [float(v) for v in test],
                         "dead_units_pct": dead_units_pct(ae, ds.x_train)}
    points[round(epochs, 3)] = final
    at = sorted(points)
    return {"ks": list(cfg.ks), "epochs": at, **{name: [points[e][name] for e in at]
                                                 for name in final}}


def feature_classifiers(args, cfg, ds, val, params, progress: bool, desc: str):
    """(classifier state, validation choice, test error % per k) of softmax classifiers on
    each model's alpha*k-sparse codes."""
    n_active = _n_active(args, cfg)
    fkw = dict(cfg=cfg.model, max_k=max(n_active))
    state = {"cls": classify.init_linear(cfg.model.hidden, len(cfg.ks)),
             "enc": jax.tree.map(jnp.asarray, params)}
    state, choice = classify.fit_on_validation(state, ds.x_train, ds.y_train, n_active, val,
                                               epochs=args.cls_epochs, desc=desc, **fkw,
                                               **_cls_options(cfg, progress))
    return state, choice, classify.error_rate(state, ds.x_test, ds.y_test, n_active, **fkw)


def _n_active(args, cfg) -> list[int]:
    return [min(int(round(args.alpha * k)), cfg.model.hidden) for k in cfg.ks]


def _cls_options(cfg, progress: bool) -> dict:
    return dict(lr=1e-3, batch_size=100, seed=cfg.seed, progress=progress)


def classifier_rows(args, cfg, ds, val, params, progress: bool) -> tuple[list, dict]:
    """Rows of the raw-pixel and feature classifiers (fine-tuned too with --finetune), each
    with validation and test error; and the classifier states (for the record)."""
    n_active, kw = _n_active(args, cfg), _cls_options(cfg, progress)
    raw, raw_choice = classify.fit_on_validation(
        {"cls": classify.init_linear(784, 1)}, ds.x_train, ds.y_train, [0], val, cfg=None,
        max_k=1, epochs=args.cls_epochs, desc="raw-pixel classifier", **kw)
    rows = [_row("raw pixels", raw_choice, 0, classify.error_rate(
        raw, ds.x_test, ds.y_test, [0], cfg=None, max_k=1)[0])]
    fkw = dict(cfg=cfg.model, max_k=max(n_active))
    state, choice, test = feature_classifiers(args, cfg, ds, val, params, progress,
                                              desc="feature classifiers")
    rows += [_row(f"k = {k}", choice, i, test[i]) for i, k in enumerate(cfg.ks)]
    choices = {"raw pixels": raw_choice, "features": choice, "n_active": n_active}
    if args.finetune:
        tuned, ft = classify.fit_on_validation(
            state, ds.x_train, ds.y_train, n_active, val, finetune=True, epochs=args.ft_epochs,
            desc="fine-tuning", **fkw, **dict(kw, lr=args.ft_lr))
        test = classify.error_rate(tuned, ds.x_test, ds.y_test, n_active, **fkw)
        rows += [_row(f"k = {k} fine-tuned", ft, i, test[i]) for i, k in enumerate(cfg.ks)]
        choices["fine-tuned"] = ft
    return rows, choices


def _row(name: str, choice: dict, i: int, test_err) -> dict:
    return {"name": name, "val_error_pct": float(choice["val_error_pct"][i]),
            "test_error_pct": float(test_err), "epoch": int(choice["epoch"][i]),
            "dead_units_pct": None, "recon_mse": None}


def markdown(table: dict) -> str:
    cfg, model = table["config"], table["config"]["model"]
    schedule = (f"k scheduled from {cfg['k_start']} over {cfg['k_anneal_frac']:g} of the budget"
                if cfg["k_start"] else "k fixed")
    lines = [f"# k-sparse features under a linear classifier: {table['dataset']}", "",
             f"{table['n_train']} training / {table['n_val']} validation (from the training set) / "
             f"{table['n_test']} test images. Tied 784-{model['hidden']} k-sparse autoencoders "
             f"({model.get('activation') or 'linear'} units, pure k-sparse), {table['budget']}, "
             f"{_recipe_words(table)}, {schedule}"
             f"{'; AuxK ' + str(cfg['aux_coef']) if cfg['aux_coef'] else ''}; "
             f"classification features keep alpha*k units (alpha = {table['alpha']}); softmax "
             f"classifiers up to {table['cls_epochs']} epochs, the epoch chosen on validation.", "",
             "| features | validation error % | test error % | dead units % | test recon MSE |",
             "|---|---:|---:|---:|---:|"]
    for r in table["rows"]:
        dead = "" if r["dead_units_pct"] is None else f"{r['dead_units_pct']:.1f}"
        mse = "" if r["recon_mse"] is None else f"{r['recon_mse']:.4f}"
        lines.append(f"| {r['name']} | {r['val_error_pct']:.2f} | {r['test_error_pct']:.2f} | "
                     f"{dead} | {mse} |")
    lines += ["", f"Wall time {table['seconds'] / 60:.1f} min. Dead units: never among the top k "
              "on the training set."]
    curve = table.get("curve") or {"epochs": []}
    if len(curve["epochs"]) > 1:
        lines += ["", "Learning curve: the feature classifiers on the autoencoders after each "
                  "epoch count (validation / test error %, dead units %):", "",
                  "| epochs | " + " | ".join(f"k = {k}" for k in curve["ks"]) + " |",
                  "|---:|" + "---:|" * len(curve["ks"])]
        for i, e in enumerate(curve["epochs"]):
            cells = [f"{v:.2f} / {t:.2f} / {d:.1f}" for v, t, d in zip(
                curve["val_error_pct"][i], curve["test_error_pct"][i], curve["dead_units_pct"][i])]
            lines.append(f"| {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _recipe_words(table: dict) -> str:
    r = table.get("recipe") or {"recipe": "default", "optimizer": "adam", "lr": 1e-3}
    opt = (f"SGD momentum {r['momentum']:g}" if r.get("optimizer") == "sgd" else "Adam")
    loss = {"half_sse": "0.5 * summed squared error", "mse": "mean-per-pixel MSE"}.get(
        r.get("loss", "mse"), r.get("loss"))
    init = f"{r['init_std']:g} * N(0, 1) init" if r.get("init_std") else "PyTorch's init"
    return (f"recipe {r['recipe']} ({opt}, lr {r['lr']:g}, batch {table['config']['batch_size']}, "
            f"{loss}, {init})")


def main(argv=None) -> runner.Run:
    return runner.execute(PaperTable(), argv)


if __name__ == "__main__":
    runner.main(PaperTable())
