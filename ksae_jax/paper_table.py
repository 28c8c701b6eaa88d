"""Makhzani & Frey's result: k-sparse features against raw pixels under a linear classifier,
on the paper's protocol.

--val images (default 10,000) are drawn from the training set as a validation split; tied
784-1000 k-sparse autoencoders train on the rest, every k in one compiled run, with the
default recipe (Adam, mean-per-pixel MSE, linear units, k scheduled down from k_start over
the first half) or --recipe paper (the authors' code, see ksae_jax.image_recipes); softmax
classifiers train on raw pixels and on each model's alpha*k-sparse codes (and, with
--finetune, with the encoder), each keeping the epoch with the lowest validation error.
--curve-epochs also trains the feature classifiers on the autoencoders as they were after
those epochs (a learning curve: error_vs_epochs.png), from their params kept in
snapshots/, so that a run stopped and continued with --resume keeps every point. Writes
table.md, table.json, features.png, snapshots/ and the autoencoders' params.pkl to --out;
`curves` draws several runs' learning curves in one figure.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import classify, flags, image_recipes, models, plotting, runner, sharding
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data.feed import ArrayRows
from ksae_jax.data.images import ImageData
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.files import write_bytes, write_json
from ksae_jax.formats import load_params_file, save_params

PAPER_MNIST = {"raw pixels": 7.2, "k = 10": 2.1, "k = 25": 1.35, "k = 40": 1.5,
               "k = 25 fine-tuned": 1.1}  # test error %, as recalled from the paper
PRESET = {"ks": (10, 25, 40, 70), "epochs": 30, "batch_size": 100}
DEFAULT_RECIPE = {"activation": "linear", "k_anneal_frac": 0.5}
QUICK = {"train_limit": 20_000, "epochs": 5, "cls_epochs": 5, "ft_epochs": 2}
MODEL_FIXED = {"arch": "mlp", "tied": True, "l1": 0.0}  # the paper's autoencoders


@dataclasses.dataclass(frozen=True)
class PaperTable:
    """The protocol's settings beside the autoencoders'."""

    val: int | None = None
    """Validation images drawn from the training set (None: 10,000, at most a sixth of it)."""
    alpha: float = 3.0
    """Classification features keep alpha*k units."""
    cls_epochs: int = 30
    """Classifier epochs (the best on validation is kept)."""
    cls_l2: tuple[float, ...] = (0.0,)
    """L2 penalties tried on the softmax weights (0.5 * l2 * |W|^2 beside the cross-entropy),
    all in one run: each classifier keeps the penalty and epoch best on validation."""
    finetune: bool = False
    """Also fine-tune encoder + classifier."""
    ft_epochs: int = 10
    """Fine-tuning epochs."""
    ft_lr: float = 1e-4
    """Fine-tuning learning rate."""
    curve_epochs: tuple[int, ...] = ()
    """Also classify with the autoencoders as they were after these epochs (each below the
    budget, which must be epochs)."""
    quick: bool = False
    """The trend in minutes: 20,000 images, 5 autoencoder and 5 classifier epochs."""

    def __post_init__(self):
        if not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")
        if not self.cls_l2 or min(self.cls_l2) < 0:
            raise ValueError(f"cls_l2 must be one or more penalties >= 0, got {self.cls_l2!r}")


GROUPS = [flags.Group("data", (ImageData,)),
          flags.Group("protocol", (PaperTable,)),
          flags.Group("autoencoders", (ImageModel,), frozenset(MODEL_FIXED)),
          flags.Group("training recipe", (image_recipes.ImageRecipe,)),
          flags.Group("sweep and budget", (SweepConfig,), frozenset({"l0_coefs"})),
          *runner.training_groups(multi_host=False)]  # the classifiers run in one process


def main(argv=None, prog: str = "python -m experiments.paper_table",
         default_out: str = "runs/paper_table") -> runner.Run:
    """The protocol: flags, data and its validation split, the autoencoders, the classifiers,
    the table (see the module docstring)."""
    t0 = time.perf_counter()
    given = flags.parse(flags.make_parser(prog, __doc__.split("\n\n")[0], GROUPS, PRESET), argv)
    values = settings(given)
    table, data = flags.build(PaperTable, values), flags.build(ImageData, values)
    cfg = sweep_config(values, None)
    if table.curve_epochs and ("epochs" not in values or max(table.curve_epochs) >= values["epochs"]):
        raise flags.UsageError("--curve-epochs: each must lie below --epochs (the budget)")
    if cfg.model.loss == "bce":
        raise flags.UsageError("--loss bce: the paper table's models have linear outputs")
    ds, val = split_data(table, data.load(), cfg.seed)
    cfg = sweep_config(values, len(ds.x_train))
    run = runner.train(cfg, ds.x_train, val[0], flags.build(runner.Output, values),
                       flags.build(runner.RunOptions, values), flags.build(runner.Devices, values),
                       default_out=default_out, on_eval=lambda t: snapshots(table, t),
                       run_info={"data": {"dataset": ds.name, "n_train": len(ds.x_train),
                                          "n_val": len(val[0])}},
                       summary=lambda t: (f"dataset {ds.name}: {len(ds.x_train)} train / "
                                          f"{len(val[0])} validation / {len(ds.x_test)} test; "
                                          f"ks {list(cfg.ks)}"))
    if sharding.is_writer():
        report(run, table, ds, val, read_snapshots(run.out, table.curve_epochs), values, t0)
    return run


def settings(given: dict) -> dict:
    """The values of a run: the preset, --quick's, the recipe's, then the flags given."""
    quick = QUICK if given.get("quick") else {}
    recipe = flags.build(image_recipes.ImageRecipe, given)
    values = {**PRESET, **quick, **recipe.values(DEFAULT_RECIPE), **MODEL_FIXED, **given}
    if "steps" in given and "epochs" not in given:
        values.pop("epochs")
    return values


def sweep_config(values: dict, n_train: int | None) -> SweepConfig:
    """The autoencoders' sweep: k scheduled from max(100, largest k) unless the recipe keeps
    it fixed; with --curve-epochs, evaluations at every gcd of the curve's epochs and the
    budget (in steps, once the training rows are counted)."""
    values, model = dict(values), flags.build(ImageModel, values)
    if values.get("k_anneal_frac", 0) > 0 and "k_start" not in values:
        values["k_start"] = min(model.latents, max((100, *values["ks"])))
    if values.get("k_start") is None:
        values.pop("k_anneal_frac", None)
    curve = values.get("curve_epochs")
    if curve and n_train and "eval_every" not in values and "epochs" in values:
        values["eval_every"] = math.gcd(*curve, values["epochs"]) * -(-n_train // values["batch_size"])
    return flags.build(SweepConfig, values, model=model)


def split_data(table: PaperTable, ds, seed: int):
    """(training images and labels, validation images and labels) from the training set."""
    n_val = table.val or min(10_000, len(ds.x_train) // 6)
    try:
        rest, x_val, y_val = ds.hold_out(n_val, seed=seed)
    except ValueError as e:
        raise flags.UsageError(f"--val: {e}") from None
    return rest, (x_val, y_val)


SNAPSHOTS = "snapshots"  # OUT/snapshots/epoch_E.pkl: the autoencoders after epoch E


def snapshots(table: PaperTable, training):
    """What training calls at every evaluation point: it writes the params of the
    --curve-epochs to OUT/snapshots (before the checkpoint of that step, so that a resumed
    run has every snapshot that its checkpoints passed)."""
    per_epoch, wanted = training.budget.steps_per_epoch, set(table.curve_epochs)
    missing = sorted(e for e in wanted if e * per_epoch not in training.budget.segment_ends(0))
    if missing:
        raise flags.UsageError(f"--curve-epochs {missing}: not evaluation points of "
                               f"--eval-every {training.budget.eval_every}")
    folder = training.checkpoint.parent / SNAPSHOTS

    def snap(step, params):
        if step % per_epoch == 0 and step // per_epoch in wanted and sharding.is_writer():
            folder.mkdir(exist_ok=True)
            save_params(folder / f"epoch_{step // per_epoch}.pkl", config=training.cfg.to_dict(),
                        ks=training.cfg.ks, params=params)
    return snap


def read_snapshots(out: Path, epochs) -> dict:
    """{epoch: params} of the --curve-epochs' snapshots in OUT/snapshots."""
    found = {}
    for e in epochs:
        path = out / SNAPSHOTS / f"epoch_{e}.pkl"
        if not path.exists():
            raise runner.RunFailed(f"{path} is missing: the learning curve needs it")
        found[e] = load_params_file(path)["params"]
    return found


def report(run: runner.Run, table: PaperTable, ds, val, snapshots: dict, values: dict,
           t0: float) -> dict:
    cfg, result, out = run.cfg, run.result, run.out
    if result.diverged:
        raise runner.RunFailed(f"autoencoders diverged: {result.diverged}; try a smaller --lr")
    progress = values.get("progress", True)
    rows, choices = classifier_rows(table, cfg, ds, val, result.params, progress)
    ae = result.models()
    test_mse = evaluate(cfg, jax.tree.map(jnp.asarray, result.params),
                        EvalSet(ArrayRows(ds.x_test, 1 / 255))).mse
    dead = dead_units_pct(ae, ds.x_train)
    for i, k in enumerate(cfg.ks):
        rows[1 + i].update(dead_units_pct=dead[i], recon_mse=float(test_mse[i]))
    curve = learning_curve(table, cfg, ds, val, snapshots, rows, run.plan["epochs"], progress)
    feats = {k: ae.decoder_features(ds.x_test, k, n=100)[0] for k in cfg.ks}
    plotting.save(plotting.feature_panels(feats, f"{ds.name}: 100 most used decoder features per k"),
                  out / "features.png")
    recipe = image_recipes.record(values.get("recipe", "default"), cfg)
    out_table = {"dataset": ds.name, "n_train": len(ds.x_train), "n_val": len(val[0]),
                 "n_test": len(ds.x_test), "config": cfg.to_dict(),
                 "budget": f"{run.plan['steps']} steps ({run.plan['epochs']:.3g} epochs)",
                 "alpha": table.alpha, "cls_epochs": table.cls_epochs, "cls_l2": list(table.cls_l2),
                 "finetune": table.finetune,
                 "ft_epochs": table.ft_epochs if table.finetune else None, "choices": choices,
                 "quick": table.quick, "recipe": recipe, "rows": rows, "curve": curve,
                 "seconds": time.perf_counter() - t0}
    if ds.name == "mnist":
        out_table["paper_mnist_error_pct"] = PAPER_MNIST
    write_json(out / "table.json", out_table)
    write_bytes(out / "table.md", markdown(out_table).encode())
    if len(curve["epochs"]) > 1:
        plotting.save(plotting.error_curves({recipe["recipe"]: curve}, ds.name, paper_by_k(ds.name)),
                      out / "error_vs_epochs.png")
    runner.save(run, {"test_mse": test_mse.tolist(), "table": rows}, extra={"dataset": ds.name})
    print("\n" + markdown(out_table))
    print(f"outputs in {out}")
    return out_table


def paper_by_k(dataset: str) -> dict | None:
    """{k: the paper's test error %} of the plain k rows (MNIST only)."""
    if dataset != "mnist":
        return None
    return {int(n[4:]): v for n, v in PAPER_MNIST.items() if n[4:].isdigit()}


def dead_units_pct(ae, images) -> list[float]:
    """Per k, the % of code units never among the top k (and nonzero) on the images."""
    return [100.0 * float(np.mean(ae.unit_usage(images, k) == 0)) for k in ae.ks]


def learning_curve(table, cfg, ds, val, snapshots: dict, rows: list, epochs: float,
                   progress: bool) -> dict:
    """Per epoch of --curve-epochs (and the budget's, from the table's rows), the feature
    classifiers' validation and test error % and the dead units % of every k."""
    final = {"val_error_pct": [r["val_error_pct"] for r in rows[1:1 + len(cfg.ks)]],
             "test_error_pct": [r["test_error_pct"] for r in rows[1:1 + len(cfg.ks)]],
             "dead_units_pct": [r["dead_units_pct"] for r in rows[1:1 + len(cfg.ks)]]}
    points = {}
    for epoch in sorted(snapshots):
        _, choice, test = feature_classifiers(table, cfg, ds, val, snapshots[epoch], progress,
                                              desc=f"classifiers at epoch {epoch}")
        ae = models.loaded(cfg, snapshots[epoch])
        points[epoch] = {"val_error_pct": [float(v) for v in choice["val_error_pct"]],
                         "test_error_pct": [float(v) for v in test],
                         "dead_units_pct": dead_units_pct(ae, ds.x_train)}
    points[round(epochs, 3)] = final
    at = sorted(points)
    return {"ks": list(cfg.ks), "epochs": at, **{name: [points[e][name] for e in at]
                                                 for name in final}}


def feature_classifiers(table, cfg, ds, val, params, progress: bool, desc: str):
    """(classifier state, validation choice, test error % per k) of softmax classifiers on
    each model's alpha*k-sparse codes."""
    n_active = _n_active(table, cfg)
    fkw = dict(cfg=cfg.model, max_k=max(n_active))
    state = {"cls": classify.init_linear(cfg.model.hidden, len(cfg.ks)),
             "enc": jax.tree.map(jnp.asarray, params)}
    state, choice = fit_choosing_l2(table, state, ds, n_active, val, desc=desc, **fkw,
                                    **_cls_options(cfg, progress))
    return state, choice, classify.error_rate(state, ds.x_test, ds.y_test, n_active, **fkw)


def fit_choosing_l2(table, state, ds, n_active, val, **kw) -> tuple[dict, dict]:
    """classify.fit_on_validation of the models in `state` under every penalty of
    table.cls_l2 at once (the model axis repeated per penalty); each model keeps the penalty,
    and epoch, with the lowest validation error. The choice says which (choice["l2"])."""
    n_l2, n = len(table.cls_l2), len(n_active)
    tiled = jax.tree.map(lambda a: jnp.concatenate([a] * n_l2), state)
    l2 = np.repeat(np.asarray(table.cls_l2, np.float64), n)  # as given, in the record
    tiled, choice = classify.fit_on_validation(tiled, ds.x_train, ds.y_train, list(n_active) * n_l2,
                                               val, epochs=table.cls_epochs, l2=l2, **kw)
    err = np.asarray(choice["val_error_pct"]).reshape(n_l2, n)
    pick = np.argmin(err, axis=0) * n + np.arange(n)  # ties: the penalty listed first
    return (jax.tree.map(lambda a: a[pick], tiled),
            {name: np.asarray(v)[pick].tolist() for name, v in {**choice, "l2": l2}.items()})


def _n_active(table, cfg) -> list[int]:
    return [min(int(round(table.alpha * k)), cfg.model.hidden) for k in cfg.ks]


def _cls_options(cfg, progress: bool) -> dict:
    return dict(lr=1e-3, batch_size=100, seed=cfg.seed, progress=progress)


def classifier_rows(table, cfg, ds, val, params, progress: bool) -> tuple[list, dict]:
    """Rows of the raw-pixel and feature classifiers (fine-tuned too with --finetune), each
    with validation and test error; and the classifier states (for the record)."""
    n_active, kw = _n_active(table, cfg), _cls_options(cfg, progress)
    raw, raw_choice = fit_choosing_l2(table, {"cls": classify.init_linear(784, 1)}, ds, [0], val,
                                      cfg=None, max_k=1, desc="raw-pixel classifier", **kw)
    rows = [_row("raw pixels", raw_choice, 0, classify.error_rate(
        raw, ds.x_test, ds.y_test, [0], cfg=None, max_k=1)[0])]
    fkw = dict(cfg=cfg.model, max_k=max(n_active))
    state, choice, test = feature_classifiers(table, cfg, ds, val, params, progress,
                                              desc="feature classifiers")
    rows += [_row(f"k = {k}", choice, i, test[i]) for i, k in enumerate(cfg.ks)]
    choices = {"raw pixels": raw_choice, "features": choice, "n_active": n_active}
    if table.finetune:
        tuned, ft = classify.fit_on_validation(
            state, ds.x_train, ds.y_train, n_active, val, finetune=True, epochs=table.ft_epochs,
            desc="fine-tuning", l2=choice["l2"], **fkw, **dict(kw, lr=table.ft_lr))
        test = classify.error_rate(tuned, ds.x_test, ds.y_test, n_active, **fkw)
        rows += [_row(f"k = {k} fine-tuned", ft, i, test[i]) for i, k in enumerate(cfg.ks)]
        choices["fine-tuned"] = ft
    return rows, choices


def _row(name: str, choice: dict, i: int, test_err) -> dict:
    return {"name": name, "val_error_pct": float(choice["val_error_pct"][i]),
            "test_error_pct": float(test_err), "epoch": int(choice["epoch"][i]),
            "dead_units_pct": None, "recon_mse": None}


def markdown(table: dict) -> str:
    model, opt = table["config"]["model"], table["config"]["optim"]
    schedule = (f"k scheduled from {opt['k_start']} over {opt['k_anneal_frac']:g} of the budget"
                if opt["k_start"] else "k fixed")
    lines = [f"# k-sparse features under a linear classifier: {table['dataset']}", "",
             f"{table['n_train']} training / {table['n_val']} validation (from the training set) / "
             f"{table['n_test']} test images. Tied 784-{model['hidden']} k-sparse autoencoders "
             f"({model.get('activation') or 'linear'} units, pure k-sparse), {table['budget']}, "
             f"{_recipe_words(table)}, {schedule}"
             f"{'; AuxK ' + str(model['aux_coef']) if model['aux_coef'] else ''}; "
             f"classification features keep alpha*k units (alpha = {table['alpha']}); softmax "
             f"classifiers up to {table['cls_epochs']} epochs, the epoch{_l2_words(table)} chosen "
             "on validation.", "",
             "| features | validation error % | test error % | epochs (chosen) | dead units % | "
             "test recon MSE |", "|---|---:|---:|---:|---:|---:|"]
    for r in table["rows"]:
        dead = "" if r["dead_units_pct"] is None else f"{r['dead_units_pct']:.1f}"
        mse = "" if r["recon_mse"] is None else f"{r['recon_mse']:.4f}"
        lines.append(f"| {r['name']} | {r['val_error_pct']:.2f} | {r['test_error_pct']:.2f} | "
                     f"{r.get('epoch', '')} | {dead} | {mse} |")
    lines += ["", f"Wall time {table['seconds'] / 60:.1f} min. Dead units: never among the top k "
              "on the training set."]
    if len(table.get("cls_l2", [0.0])) > 1:
        chosen = [table["choices"]["raw pixels"]["l2"][0], *table["choices"]["features"]["l2"]]
        lines += ["", "L2 penalties chosen: " + ", ".join(
            f"{r['name']} {v:g}" for r, v in zip(table["rows"], chosen)) + "."]
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


def _l2_words(table: dict) -> str:
    grid = table.get("cls_l2", [0.0])
    return "" if len(grid) == 1 and grid[0] == 0 else (
        f" and the L2 penalty (of {', '.join(f'{v:g}' for v in grid)})")


def _recipe_words(table: dict) -> str:
    r = table.get("recipe") or {"recipe": "default", "optimizer": "adam", "lr": 1e-3}
    opt = (f"SGD momentum {r['momentum']:g}" if r.get("optimizer") == "sgd" else "Adam")
    loss = {"half_sse": "0.5 * summed squared error", "mse": "mean-per-pixel MSE"}.get(
        r.get("loss", "mse"), r.get("loss"))
    init = f"{r['init_std']:g} * N(0, 1) init" if r.get("init_std") else "PyTorch's init"
    return (f"recipe {r['recipe']} ({opt}, lr {r['lr']:g}, batch {table['config']['batch_size']}, "
            f"{loss}, {init})")


def read_curve(spec: str) -> tuple[str, str, dict]:
    """(label, dataset, curve) of one LABEL=RUN (a paper table's output folder)."""
    label, _, folder = spec.rpartition("=")
    try:
        table = json.loads((Path(folder) / "table.json").read_text())
    except (OSError, ValueError) as e:
        raise flags.UsageError(f"run {folder}: {e}") from None
    curve = table.get("curve")
    if not curve or len(curve["epochs"]) < 2:
        raise flags.UsageError(f"run {folder}: table.json has no learning curve (run the paper "
                               "table with --curve-epochs)")
    return label or table.get("recipe", {}).get("recipe", folder), table["dataset"], curve


def curves(runs: list[str], out: Path) -> dict:
    """Several runs' learning curves in one figure (and, beside it, a .json of them)."""
    read = [read_curve(s) for s in runs]
    datasets = {d for _, d, _ in read}
    if len(datasets) > 1:
        raise flags.UsageError(f"the runs are of different data sets: {sorted(datasets)}")
    drawn = {label: c for label, _, c in read}
    if len(drawn) < len(read):
        raise flags.UsageError("two runs have the same label: give LABEL=RUN")
    dataset = datasets.pop()
    plotting.save(plotting.error_curves(drawn, dataset, paper_by_k(dataset)), out)
    write_json(out.with_suffix(".json"), {"dataset": dataset, "curves": drawn})
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return drawn
