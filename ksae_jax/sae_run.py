"""`ksae train`: SAEs of any family trained on vectors, every model of the sweep in one compiled
run, from .npy files (or generated vectors with known features), or live from a running
language model (--model: every hookpoint and every k at once, ksae_jax.live_run); optionally
from a saved SAE (--init) and judged in the language model the vectors came from (--lm). Writes params.pkl,
metrics.json and figures, and prints a table.

metrics.json: ks (and l0_coefs), the budget and batching, held-out fvu / mse / l0 / dead_frac,
dead_frac_window (not fired over the training window), the log10 firing-frequency histograms,
the history, the LM fields with --lm, mmcs and recovered_frac on generated vectors, seconds
and the config.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ksae_jax import flags, inference, plotting, runner, sharding
from ksae_jax.config import SweepConfig
from ksae_jax.data.synthetic import SyntheticData, recovery
from ksae_jax.data.vectors import VectorData, VectorSource
from ksae_jax.files import write_json
from ksae_jax.models import SaeModel, registry
from ksae_jax.models.clt import CLTModel
from ksae_jax.models.transcoder import TranscoderModel
from ksae_jax.safe_pickle import ParamsFileError

HIST_BINS = np.linspace(-7, 0, 29)  # log10 firing frequency
SHAPE_FIELDS = ("d_in", "latents", "arch", "prefixes")  # --init: the saved SAE's
INIT_FIELDS = ("init_scale", "b_dec_init", "b_enc_init", "b_enc_mean_keep", "init_dirs", "init_mix",
               "init_l0", "transcoder_init")  # --init: the saved SAE's params replace any init


@dataclasses.dataclass(frozen=True)
class Start:
    """Where the models start."""

    init: Path | None = None
    """Train on from this SAE: a ksae_jax params.pkl or export, or a sparsify or SAELens folder
    (its family, shapes and ks are the run's)."""


def model_classes() -> dict[str, type]:
    """--arch name -> model config of the families on vectors (SAEs and transcoders)."""
    return {arch: registry.lookup(arch).config
            for arch in registry.archs((SaeModel, TranscoderModel, CLTModel))}


def model_configs() -> tuple[type, ...]:
    """The model configs, each once (transcoder and skip-transcoder share one)."""
    return tuple(dict.fromkeys(model_classes().values()))


def refuse_live_flags(given: dict) -> None:
    """A live run's settings given to a run on vectors: refused, not ignored."""
    import dataclasses

    from ksae_jax.lm.e2e import Objective
    from ksae_jax.lm.live import LiveData

    for cls in (LiveData, Objective):
        for f in dataclasses.fields(cls):
            if f.name in given:
                raise flags.UsageError(f"{flags.flag(f.name)}: a setting of a live run "
                                       "(--model), not of one on --data")


def groups(data_cls: type = VectorData) -> list[flags.Group]:
    from ksae_jax.lm.splice import SpliceConfig

    from ksae_jax.lm.e2e import Objective
    from ksae_jax.lm.live import LiveData

    vectors = data_cls is VectorData
    return [flags.Group("data", (data_cls,)),
            *([flags.Group("or a language model, run live (needs requirements-lm.txt)",
                           (LiveData, Objective))] if vectors else []),
            flags.Group("model (the family: --arch)", model_configs(),
                        frozenset({"d_in", "n_layers"}), key="arch"),
            flags.Group("sweep and budget", (SweepConfig,), frozenset({"hookpoints"})),
            *([flags.Group("start", (Start,)),
               flags.Group("language model of the vectors (needs requirements-lm.txt)",
                           (SpliceConfig,))] if vectors else []),
            *runner.training_groups()]


def main(argv=None, *, data_cls: type = VectorData, preset: dict | None = None,
         prog: str = "ksae train", default_out: str = "runs/sae") -> runner.Run:
    """The command: flags, data, config, training, report (see the module docstring)."""
    preset = {"arch": registry.DEFAULT_SAE, **(preset or {})}
    shown = {"ks": SaeModel.default_sweep, "l0_coefs": registry.lookup("jumprelu").config
             .default_sweep, **SaeModel.training_defaults}
    either = {"data": None} if data_cls is VectorData else {}  # --data or --model
    parser = flags.make_parser(prog, __doc__.split("\n\n")[0], groups(data_cls),
                               {**preset, **either}, shown=shown)
    given = flags.parse(parser, argv)
    values = {**preset, **given}
    if either and ("model" in given) == ("data" in given):
        raise flags.UsageError("give --data (vectors on disk) or --model (a language model "
                               "run live), one of the two")
    if "model" in given:
        from ksae_jax import live_run
        return live_run.main(given, values, default_out=default_out)
    refuse_live_flags(given)
    if "epochs" in given and "steps" not in given:  # the budget given replaces the preset's
        values.pop("steps", None)
    source, devices = flags.build(data_cls, values), flags.build(runner.Devices, values)
    start = None if given.get("init") is None else load_start(given["init"])
    cfg = (sweep_config(values, source.d) if start is None
           else start_config(given, values, start, source.d))
    splice = splice_evaluation(values, source.data, source.d) if "lm" in given else None
    devices.start()
    rows, held, info, features = open_data(source)
    run = runner.train(cfg, rows, held, flags.build(runner.Output, values),
                       flags.build(runner.RunOptions, values), devices, default_out=default_out,
                       run_info={"data": info}, summary=lambda t: summary(t, rows, held),
                       init=None if start is None else start.params,
                       input_scale=None if start is None else start.input_scale)
    if sharding.is_writer():
        report(run, info, rows, held, splice, features)
    return run


def sweep_config(values: dict, d_in: int, hookpoint: str | None = None) -> SweepConfig:
    """The sweep the flags ask for on d_in-wide vectors (read at a live run's hookpoint)."""
    classes = model_classes()
    try:
        shape = classes[values.get("arch", registry.DEFAULT_SAE)].width_fields(d_in, hookpoint)
    except ValueError as e:
        raise flags.UsageError(str(e)) from None
    model = flags.build_choice(classes, "arch", values, registry.DEFAULT_SAE, **shape)
    return flags.build(SweepConfig, values, model=model)


def load_start(path: Path):
    try:
        return inference.load(path)
    except (ParamsFileError, OSError) as e:
        raise flags.UsageError(f"--init {e}") from None


def start_config(given: dict, values: dict, start, d_in: int) -> SweepConfig:
    """The sweep of a run that trains on from a saved SAE (--init): its model (shape and init
    fields kept, the recipe's others as given) and its ks, the training flags of this run."""
    mc, name = start.model_config, f"--init {given['init']}"
    if mc.input_width != d_in:
        raise flags.UsageError(f"{name}: the model takes rows of width {mc.input_width}; the data "
                               f"have d = {d_in}")
    for field, its in [(f, getattr(mc, f, None)) for f in SHAPE_FIELDS] + \
            [("ks", start.config.ks), ("l0_coefs", start.config.l0_coefs)]:
        value = given.get(field)
        if field in given and (tuple(value) if isinstance(value, list) else value) != its:
            raise flags.UsageError(f"{flags.flag(field)} {value}: {name} has {its}")
    if any(f in given for f in INIT_FIELDS):
        raise flags.UsageError(f"{flags.flag(next(f for f in INIT_FIELDS if f in given))}: the "
                               f"models start from {name}, not from an initialisation")
    own = {f.name for f in dataclasses.fields(mc)} - set(SHAPE_FIELDS)
    others = {f.name for cls in model_classes().values() for f in dataclasses.fields(cls)}
    for field in sorted((others & set(given)) - own - set(SHAPE_FIELDS)):  # refused, not ignored
        raise flags.UsageError(f"{flags.flag(field)}: not a setting of {mc.arch} models")
    try:
        model = dataclasses.replace(mc, **{k: v for k, v in given.items() if k in own})
    except (ValueError, TypeError) as e:
        raise flags.UsageError(str(e)) from None
    return flags.build(SweepConfig, values, model=model, ks=start.config.ks,
                       l0_coefs=start.config.l0_coefs)


def open_data(source) -> tuple:
    """(training rows, held-out rows, what metrics.json records of them, the true features of
    generated vectors or None)."""
    if isinstance(source, SyntheticData):
        syn = source.generate()
        rows = VectorSource([syn.x], ["synthetic"])
        return (rows.view(0, source.rows), rows.view(source.rows, rows.n),
                {"synthetic": dataclasses.asdict(source)}, syn.features)
    split = source.open()
    return split.train, split.eval, source.info(split.train.n), None


def splice_evaluation(values: dict, data: Path, d: int | None = None):
    """The spliced evaluation --lm asks for, set up before training (a bad model, layer,
    context or text, or a layer of another width than the data's d: one line, exit 2)."""
    from ksae_jax import lm

    try:
        lm.require()
        from ksae_jax.lm import model as lm_model
        from ksae_jax.lm import splice, text
        evaluation = flags.build(splice.SpliceConfig, values).evaluation(data)
    except (lm.LMUnavailable, lm_model.LMError, text.TextError, ValueError) as e:
        raise flags.UsageError(f"--lm: {e}") from None
    if d is not None and evaluation.width() != d:
        raise flags.UsageError(f"--lm: layer {evaluation.layer} of {values['lm']} is "
                               f"{evaluation.width()} wide; the data have d = {d}")
    return evaluation


def summary(training, rows, held) -> str:
    cfg, scale = training.run_cfg, training.input_scale
    fed = "from the device" if training.feeder.mode == "device" else "read by a background thread"
    return (f"data {rows.name}: {rows.n:,} training / {held.n:,} held-out vectors of d = {rows.d}; "
            f"{cfg.model.latents:,} latents, {cfg.model.arch} {cfg.label_name}s "
            f"{list(cfg.labels)}; batches {fed}"
            f"{f'; inputs scaled by {scale:.4g}' if cfg.model.normalize else ''}")


def report(run: runner.Run, info: dict, rows, held, splice=None, features=None) -> dict:
    """metrics.json, params.pkl, the figures and the printed table of a finished run."""
    metrics = sweep_metrics(run, info, rows, held)
    if splice is not None and run.result.on_host:
        metrics.update(splice(run.result.models(), list(run.cfg.labels)))
    if features is not None:
        found = [recovery(w, features) for w in run.result.params["W_dec"]]
        metrics.update(mmcs=[f[0] for f in found], recovered_frac=[f[1] for f in found],
                       generator=info["synthetic"])
    write_json(run.out / "metrics.json", metrics)
    runner.save(run, metrics, extra={"data": rows.name})
    if run.result.on_host:  # the figures of the decoder rows need the params here
        write_figures(run, metrics, run.result.models(metrics))
    print_table(run.cfg, metrics)
    print(f"wall time {run.result.seconds:.1f} s ({run.result.compile_seconds:.1f} s compile "
          f"+ first step); outputs in {run.out}")
    return metrics


def sweep_metrics(run: runner.Run, info: dict, rows, held) -> dict:
    cfg, result = run.cfg, run.result
    f, h = result.final, result.history
    freq = f.counts / f.n
    hist = [np.histogram(np.log10(row[row > 0]), HIST_BINS)[0].tolist() for row in freq]
    return {
        "ks": list(cfg.ks), **({"l0_coefs": list(cfg.l0_coefs)} if cfg.l0_coefs else {}),
        "arch": cfg.model.arch, **run.plan,
        "fvu": f.fvu.tolist(), "mse": f.mse.tolist(), "l0": f.l0.tolist(),
        "dead_frac": f.dead_frac.tolist(),
        **{name: v.tolist() for name, v in f.extra.items()},
        "dead_frac_window": [d[-1] for d in h["window_dead_frac"]],
        "firing_log10_hist": {"bin_edges": HIST_BINS.tolist(), "counts": hist},
        "history": {"step": h["step"], "train_fvu": h["train_rec"], "eval_fvu": h["eval_fvu"],
                    "window_dead_frac": h["window_dead_frac"]},
        "diverged": {str(k): v for k, v in result.diverged.items()},
        "data": info, "n_train": rows.n, "n_eval": held.n, "d": rows.d,
        "input_scale": result.input_scale, "seconds": result.seconds,
        "compile_seconds": result.compile_seconds, "config": cfg.to_dict(),
    }


def write_figures(run: runner.Run, metrics: dict, sae) -> None:
    cfg, result, out = run.cfg, run.result, run.out
    labels = list(cfg.labels)
    plotting.save(plotting.fvu_vs_k(labels, metrics["fvu"], metrics["dead_frac"],
                                    name=cfg.label_name), out / "fvu_vs_k.png")
    plotting.save(plotting.firing_histograms(labels, result.final.counts, result.final.n),
                  out / "firing_freq.png")
    h = metrics["history"]
    plotting.save(plotting.training_curves(labels, h["step"], h["train_fvu"], h["window_dead_frac"]),
                  out / "training_curves.png")
    if "mmcs" in metrics:
        plotting.save(plotting.recovery_vs_k(labels, metrics["mmcs"], metrics["recovered_frac"],
                                             metrics["dead_frac"]), out / "mmcs_vs_k.png")
    if cfg.model.d_in == 28 * 28:  # vectors that are images: decoder rows as tiles
        tiles = {}
        for label in sae.labels:
            top = np.argsort(-result.final.counts[labels.index(label)], kind="stable")[:100]
            tiles[label] = sae.decoder_directions(label)[top].reshape(-1, 28, 28)
        plotting.save(plotting.feature_panels(tiles, "decoder rows of the 100 most used latents"),
                      out / "decoder_tiles.png")


def print_table(cfg: SweepConfig, metrics: dict) -> None:
    lm = "delta_loss" in metrics
    print(f"\n{cfg.label_name:>7} {'FVU':>8} {'MSE':>10} {'L0':>7} {'dead (held-out)':>16} "
          f"{'dead (window)':>14}" + (f" {'delta loss':>11} {'recovered':>10} {'KL':>8}" if lm else "")
          + (f" {'MMCS':>7} {'recovered':>10}" if "mmcs" in metrics else ""))
    for i, k in enumerate(cfg.labels):
        if str(k) in metrics["diverged"]:
            print(f"{k!s:>7}  diverged (not saved)")
            continue
        print(f"{k!s:>7} {metrics['fvu'][i]:>8.4f} {metrics['mse'][i]:>10.4g} {metrics['l0'][i]:>7.2f} "
              f"{100 * metrics['dead_frac'][i]:>15.2f}% {100 * metrics['dead_frac_window'][i]:>13.2f}%"
              + (f" {metrics['delta_loss'][i]:>11.4f} {metrics['loss_recovered'][i]:>10.4f} "
                 f"{metrics['kl'][i]:>8.4f}" if lm else "")
              + (f" {metrics['mmcs'][i]:>7.4f} {100 * metrics['recovered_frac'][i]:>9.1f}%"
                 if "mmcs" in metrics else ""))
    if "prefix_fvu" in metrics:
        print(f"prefix FVU (latents {', '.join(map(str, cfg.model.prefixes))}): " + "; ".join(
            f"{k}: " + " ".join(f"{v:.4f}" for v in row) for k, row in zip(cfg.labels,
                                                                      metrics["prefix_fvu"])))
    if lm:
        print(f"LM loss (nats/token, {metrics['lm_tokens']:,} held-out predictions): clean "
              f"{metrics['lm_loss_clean']:.4f}, zero-ablated {metrics['lm_loss_zero']:.4f}")
