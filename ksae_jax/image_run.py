"""A k sweep of image autoencoders (the original PyTorch project's study, every k in one
compiled run): flags, data, training, and the report (metrics.json, params.pkl, the
original's reconstruction figures, every k on the same test images, loss curves, the units'
features, a printed table).

Budget: the original's 9 epochs of batch 600 (900 steps on 60,000 images); on the offline
sample (4,000 images, where 9 epochs would be 63 steps) 700 steps of batch 200 instead, which
reach the original's quality in a few minutes on 2 CPU cores. --steps or --epochs and
--batch-size override both.
"""
from __future__ import annotations

from ksae_jax import flags, image_recipes, plotting, runner, sharding
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data.images import ImageData
from ksae_jax.files import write_json

N_SHOW = 9  # images per reconstruction figure, as the original
SAMPLE_BUDGET = {"steps": 700, "batch_size": 200}  # the offline sample's (the original's: the config's)
GROUPS = [flags.Group("data", (ImageData,)),
          flags.Group("model", (ImageModel,)),
          flags.Group("training recipe", (image_recipes.ImageRecipe,)),
          flags.Group("sweep and budget", (SweepConfig,), frozenset({"l0_coefs"})),
          *runner.training_groups()]


def budget(values: dict, sample: bool) -> dict:
    """The offline sample's budget where the flags give none: 700 steps of batch 200 (9 of
    its epochs would be 63 steps); elsewhere the config's, the original's 9 epochs of 600."""
    if not sample:
        return {}
    given = "steps" in values or "epochs" in values
    return {"batch_size": SAMPLE_BUDGET["batch_size"], **({} if given else
                                                           {"steps": SAMPLE_BUDGET["steps"]})}


def sweep_config(values: dict, sample: bool) -> SweepConfig:
    """The sweep the flags, the recipe and the data's budget ask for."""
    values = {**budget(values, sample), **values}
    return flags.build(SweepConfig, values, model=flags.build(ImageModel, values))


def main(argv=None, prog: str = "python -m experiments.ksweep",
         default_out: str = "runs/ksweep") -> runner.Run:
    """The command: flags, data, config, training, report (see the module docstring)."""
    parser = flags.make_parser(prog, __doc__.split("\n\n")[0], GROUPS,
                               shown={"ks": ImageModel.default_sweep})
    given = flags.parse(parser, argv)
    recipe = flags.build(image_recipes.ImageRecipe, given)
    values = {**recipe.values({}), **given}
    data, devices = flags.build(ImageData, values), flags.build(runner.Devices, values)
    cfg = sweep_config(values, data.is_sample)  # a bad flag ends the run before data are read
    devices.start()
    ds = data.load()
    if ds.name == "mnist-sample" and not data.is_sample:  # the offline sample: its own budget
        cfg = sweep_config(values, True)
    source = str(data.idx_dir) if data.idx_dir else ds.name
    run = runner.train(cfg, ds.x_train, ds.x_test, flags.build(runner.Output, values),
                       flags.build(runner.RunOptions, values), devices, default_out=default_out,
                       run_info={"data": {"dataset": ds.name, "source": source,
                                          "n_train": len(ds.x_train)}},
                       summary=lambda t: (f"dataset {ds.name}: {len(ds.x_train)} train / "
                                          f"{len(ds.x_test)} test images; {cfg.model.arch} "
                                          f"model, ks {list(cfg.ks)}"))
    if sharding.is_writer():
        report(run, ds, source, image_recipes.record(recipe.recipe, run.cfg))
    return run


def report(run: runner.Run, ds, source: str, recipe: dict) -> dict:
    cfg, result = run.cfg, run.result
    h = result.history
    metrics = {
        "ks": list(cfg.ks), **run.plan, "step": h["step"],
        "train_loss": h["train_loss"], "train_mse": h["train_rec"],
        "test_mse": {"per_eval": h["eval_mse"], "final": [m[-1] for m in h["eval_mse"]]},
        "dead_units_frac": [m[-1] for m in h["eval_dead_frac"]],
        "diverged": {str(k): v for k, v in result.diverged.items()},
        "dataset": ds.name, "data_source": source,
        "n_train": len(ds.x_train), "n_test": len(ds.x_test),
        "seconds": result.seconds, "compile_seconds": result.compile_seconds,
        "recipe": recipe, "config": cfg.to_dict(),
    }
    write_json(run.out / "metrics.json", metrics)
    runner.save(run, metrics, extra={"dataset": ds.name})
    write_figures(run, ds, result.models(metrics))
    print_table(cfg, result, metrics)
    print(f"wall time {result.seconds:.1f} s ({result.compile_seconds:.1f} s compile + first "
          f"step); outputs in {run.out}")
    return metrics


def write_figures(run: runner.Run, ds, ae) -> None:
    h, out = run.result.history, run.out
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
