"""Train a TopK sparse autoencoder for every k of a sweep on (N, d) vectors, in one compiled
run; write params, metrics and figures.

    python -m experiments.sae --data acts.npy --latents 8192 --ks 8 16 32 64 --steps 2000
    python -m experiments.sae --data shards/ --eval-data held_out.npy --normalize --multi-topk

--data: one .npy (memory-mapped, never read whole), or a folder of .npy shards of equal d
(in name order). Held out: --eval-data, or the last --eval-frac of the data (at most 65,536
rows). The recipe (Gao et al. 2024): decoder rows kept at unit norm, b_dec initialised at the
training rows' mean (Gao et al.: their geometric median, --b-dec-init median), Adam eps
6.25e-10 and lr 2e-4 / sqrt(latents / 2^14), AuxK on the latents that have not fired for
--dead-tokens training vectors.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ksae_jax import cli, config, inference, models, native_ops, plotting, runner
from ksae_jax.config import sae_config
from ksae_jax.data import vectors
from ksae_jax.files import write_json

HIST_BINS = np.linspace(-7, 0, 29)  # log10 firing frequency


def init_scale(text: str):
    return "fit" if text == "fit" else cli.positive_float(text)


def add_sae_flags(p, ks=(16, 32, 64, 128), latents=None) -> None:
    """The model, budget, recipe and run flags every vector experiment shares."""
    p.add_argument("--latents", type=cli.positive_int, default=latents,
                   help=f"latents n (default {latents or '8 x d'})")
    p.add_argument("--arch", choices=config.SAE_ARCHS, default=None,
                   help="topk (default), batchtopk (top B k of a batch, served with a threshold), "
                        "matryoshka (BatchTopK with nested prefixes), jumprelu (a threshold per "
                        "latent and an L0 penalty)")
    p.add_argument("--ks", type=cli.int_value, nargs="*", default=None,
                   help=f"k values, all trained in one compiled run (default {' '.join(map(str, ks))}; "
                        "not for jumprelu)")
    p.add_argument("--l0-coefs", type=cli.nonneg_float, nargs="*", default=None,
                   help="jumprelu: L0 coefficients, one model each, all in one run (default "
                        f"{' '.join(map(str, models.JumpReLUFamily.default_sweep))})")
    p.add_argument("--prefixes", type=cli.positive_int, nargs="*", default=(),
                   help="matryoshka: nested prefix sizes below --latents (default n/16 n/4 n/2)")
    p.add_argument("--bandwidth", type=cli.positive_float, default=0.05,
                   help="jumprelu: width of the straight-through kernel (default 0.05)")
    p.add_argument("--init-l0", type=cli.positive_int, default=64,
                   help="jumprelu: thresholds start where each latent fires on init-l0 / n rows")
    p.add_argument("--threshold-lr", type=cli.positive_float, default=0.01,
                   help="batchtopk, matryoshka: step of the running threshold estimate")
    p.add_argument("--init", type=Path, default=None, metavar="SAE",
                   help="train on from this SAE: a ksae_jax params.pkl or export, or a sparsify "
                        "or SAELens folder (its family, shapes and ks are the run's)")
    p.set_defaults(default_ks=list(ks))
    cli.add_budget_flags(p, batch_size=4096)
    p.add_argument("--lr", type=cli.positive_float, default=None,
                   help="Adam learning rate (default 2e-4 / sqrt(latents / 2^14))")
    p.add_argument("--warmup-steps", type=cli.positive_int, default=0)
    p.add_argument("--k-start", type=cli.positive_int, default=None,
                   help="k at the start of training, lowered linearly to each model's k over "
                        "the first --k-anneal-frac of the budget (default: k fixed)")
    p.add_argument("--k-anneal-frac", type=cli.nonneg_float, default=0.25,
                   help="fraction of the budget over which k falls from --k-start (default 0.25)")
    p.add_argument("--lr-decay-frac", type=cli.nonneg_float, default=0.0,
                   help="decay the learning rate linearly to 0 over this last fraction of the "
                        "budget (default 0: constant)")
    p.add_argument("--adam-eps", type=cli.positive_float, default=6.25e-10,
                   help="Adam epsilon (default 6.25e-10, Gao et al.; torch's and sparsify's: 1e-8)")
    p.add_argument("--init-scale", type=init_scale, default=None,
                   help="norm of the encoder rows at init, W_enc = scale * W_dec, or 'fit': "
                        "each k's scale fitted to its first reconstructions (default fit; "
                        "jumprelu: 1)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of the dense matmuls (bfloat16: f32 accumulation, f32 "
                        "weights and Adam)")
    p.add_argument("--b-dec-init", choices=config.B_DEC_INITS, default="mean",
                   help="b_dec at init: mean (the default) or geometric median of training "
                        "rows, or zero")
    p.add_argument("--b-enc-init", choices=config.B_ENC_INITS, default=None,
                   help="b_enc at init: zero; balanced: each latent's threshold at its own "
                        "(1 - k/n) quantile over training rows (default balanced; jumprelu: "
                        "zero)")
    p.add_argument("--b-enc-mean-keep", type=cli.unit_float, default=None, metavar="F",
                   help="--b-enc-init balanced: the share of the latents' mean threshold kept "
                        "(1: each its own threshold; 0: the thresholds less their mean, the same "
                        "latents chosen at full value; default 0.5)")
    p.add_argument("--init-dirs", choices=config.INIT_DIRS, default=None,
                   help="decoder rows at init: random, along training rows, those mixed with "
                        "--init-mix of a random direction, or training rows no two within "
                        "cosine 0.9 (diverse)")
    p.add_argument("--init-mix", type=cli.nonneg_float, default=None,
                   help="--init-dirs mixed: weight of the random unit direction added to each "
                        "data direction (default 1)")
    p.add_argument("--clip-norm", type=cli.positive_float, default=None,
                   help="clip each model's gradient to this global norm")
    p.add_argument("--normalize", action="store_true",
                   help="scale the inputs by one constant so that their mean squared norm is d")
    cli.add_auxk_flags(p, aux_coef=1 / 32)
    p.add_argument("--resample-every", type=cli.int_value, default=0, metavar="STEPS",
                   help="over the first half of the budget, after every STEPS steps, start the "
                        "latents that have not fired since again along the batch's residuals "
                        "(0: off, the default)")
    p.add_argument("--multi-topk", action="store_true", help="add FVU at 4k with weight 1/8")
    p.add_argument("--decoder", choices=config.DECODERS, default="auto",
                   help="sparse (gather/scatter custom VJPs on XLA ops), native (the same on "
                        "native C++ CPU kernels) or dense products (default: by k / n, native "
                        "where the kernels serve)")
    p.add_argument("--feeder", choices=("auto", "device", "host"), default="auto",
                   help="data on the device, or read by a background thread (default: by size)")
    p.add_argument("--seed", type=cli.int_value, default=0)


def add_lm_flags(p) -> None:
    """The spliced evaluation on the language model the vectors came from."""
    g = p.add_argument_group("language model (needs requirements-lm.txt)")
    g.add_argument("--lm", default=None, metavar="NAME_OR_DIR",
                   help="the causal LM of the activations: adds its loss with each SAE's "
                        "reconstruction spliced in (delta_loss, loss_recovered, KL)")
    g.add_argument("--layer", type=cli.int_value, default=None,
                   help="the block whose output the activations are (default: the cache's meta.json)")
    g.add_argument("--lm-text", default=None,
                   help="text whose held-out documents are evaluated (default: the cache's, or gcide)")
    g.add_argument("--lm-tokens", type=cli.positive_int, default=16_384,
                   help="predictions evaluated (default 16,384)")


def cache_meta(data: Path) -> dict:
    """The meta.json of the activation cache --data belongs to (DIR/train -> DIR/meta.json)."""
    for folder in (data, data.parent):
        if (folder / "meta.json").is_file():
            return json.loads((folder / "meta.json").read_text())
    return {}


def sweep_ks(args) -> tuple:
    """The ks of the sweep (none for a family that sweeps another hyperparameter)."""
    arch = args.arch or "topk"
    over = models.FAMILIES[arch].sweeps_over
    if over != "ks":
        if args.ks:
            raise cli.UsageError(f"--ks: {arch} has no k; sweep --{over.replace('_', '-')} instead")
        return ()
    if args.l0_coefs:
        raise cli.UsageError(f"--l0-coefs: only jumprelu has an L0 penalty, not {arch}")
    return tuple(args.default_ks if args.ks is None else args.ks)


def training_fields(args) -> dict:
    """The SweepConfig fields of the budget and recipe flags, the same for a fresh run and
    one that trains on from an SAE (--init)."""
    fields = dict(steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
                  seed=args.seed, eps=args.adam_eps, warmup_steps=args.warmup_steps,
                  lr_decay_frac=args.lr_decay_frac, clip_norm=args.clip_norm,
                  aux_coef=args.aux_coef, aux_k=args.aux_k, dead_tokens=args.dead_tokens,
                  resample_every=args.resample_every, batching=args.batching,
                  eval_every=args.eval_every)
    if args.k_start is not None:
        if args.k_anneal_frac == 0:
            raise cli.UsageError("--k-start schedules k: give --k-anneal-frac > 0 too")
        fields.update(k_start=args.k_start, k_anneal_frac=args.k_anneal_frac)
    return fields


def start_config(start, args, spec: dict, extra: dict):
    """The config of a run that trains on from an SAE (--init): its model and its models'
    ks, the training flags of this run."""
    mc = start.model_config
    if spec["d"] != mc.d_in:
        raise cli.UsageError(f"--init {args.init}: the SAE takes d = {mc.d_in}; the data have "
                             f"d = {spec['d']}")
    for flag, value, its in (("--latents", args.latents, mc.hidden), ("--arch", args.arch, mc.arch)):
        if value is not None and value != its:
            raise cli.UsageError(f"{flag} {value}: --init {args.init} is {its}")
    if args.ks and tuple(args.ks) != start.config.ks:
        raise cli.UsageError(f"--ks: --init {args.init} holds ks {list(start.config.ks)}")
    cfg = sae_config(mc.d_in, start.config.ks, latents=mc.hidden, arch=mc.arch,
                     l0_coefs=start.config.l0_coefs, **training_fields(args),
                     **({"lr": extra["lr"]} if "lr" in extra else {}))
    return dataclasses.replace(cfg, model=mc)


def family_flags(args) -> dict:
    """The model-config fields of the family --arch names, from its flags."""
    arch = args.arch or "topk"
    cls = models.FAMILIES[arch]
    fields = {"arch": arch, **{name: getattr(args, name) for name in cls.flags}}
    if "prefixes" in fields:
        fields["prefixes"] = tuple(fields["prefixes"])
    elif args.prefixes:
        raise cli.UsageError(f"--prefixes: only matryoshka has nested prefixes, not {arch}")
    if cls.sweeps_over == "l0_coefs":
        fields["l0_coefs"] = tuple(args.l0_coefs or cls.default_sweep)
    return fields


class Sae(runner.Experiment):
    """TopK SAEs on the vectors of --data: the flags, config, report of every SAE experiment."""

    name = "sae"
    doc = __doc__
    lm_eval = None  # the spliced evaluation, when --lm is given
    start = None    # the SAE training starts from, when --init is given

    def add_flags(self, p):
        p.add_argument("--data", type=Path, default=None,
                       help=".npy file or folder of .npy shards (required unless --plan)")
        p.add_argument("--eval-data", type=Path, default=None, help="held-out .npy (or folder)")
        p.add_argument("--eval-frac", type=cli.positive_float, default=0.05,
                       help="held out from the end of --data when no --eval-data (default 0.05)")
        p.add_argument("--skip-nonfinite", action="store_true",
                       help="drop rows holding NaN or Inf instead of refusing the data")
        add_sae_flags(p)
        add_lm_flags(p)
        g = p.add_argument_group("the compiler's plan (no data, nothing allocated)")
        g.add_argument("--plan", action="store_true",
                       help="compile one training step of this sweep on --mesh from abstract "
                            "shapes and print its memory, FLOPs and collectives per device")
        g.add_argument("--d-in", type=cli.positive_int, default=None,
                       help="--plan: width of the vectors (there is no --data)")
        cli.add_run_flags(p, default_out=self.default_out)

    def run_instead(self, args):
        if args.plan:
            run_plan(self, args)
        return args.plan

    def check_flags(self, args):
        if args.plan:
            if args.d_in is None or args.mesh is None:
                raise cli.UsageError("--plan needs --d-in and --mesh")
            return
        if args.data is None:
            raise cli.UsageError("the following arguments are required: --data")
        if args.init_mix is not None and args.init_dirs != "mixed":
            raise cli.UsageError("--init-mix: only --init-dirs mixed mixes in random directions")
        b_enc_init = args.b_enc_init or config.SAE_MODELS[args.arch or "topk"].b_enc_init
        if args.b_enc_mean_keep is not None and b_enc_init == "zero":
            raise cli.UsageError("--b-enc-mean-keep: only --b-enc-init balanced has thresholds")
        if args.eval_frac >= 1:
            raise cli.UsageError(f"--eval-frac must be below 1, got {args.eval_frac}")
        if args.decoder == "native" and (why := native_ops.unavailable()):
            raise cli.UsageError(f"--decoder native: {why}")
        self.lm_eval = None if args.lm is None else lm_evaluation(args)
        self.start = None if args.init is None else inference.load(args.init)

    def describe(self, args):
        return {"d": vectors.open_vectors(args.data, scan=False).d}

    def config(self, args, spec):
        extra = {} if args.lr is None else {"lr": args.lr}
        extra.update(family_flags(args))
        if self.start is not None:
            return start_config(self.start, args, spec, extra)
        return sae_config(
            spec["d"], sweep_ks(args), latents=args.latents, decoder=args.decoder,
            multi_topk=args.multi_topk, normalize=args.normalize,
            **({} if args.init_scale is None else {"init_scale": args.init_scale}),
            b_dec_init=args.b_dec_init, dtype=args.dtype,
            **({} if args.b_enc_init is None else {"b_enc_init": args.b_enc_init}),
            **({} if args.init_dirs is None else {"init_dirs": args.init_dirs}),
            **({} if args.init_mix is None else {"init_mix": args.init_mix}),
            **({} if args.b_enc_mean_keep is None else {"b_enc_mean_keep": args.b_enc_mean_keep}),
            **training_fields(args), **extra)

    def load(self, args):
        source = vectors.open_vectors(args.data, skip_nonfinite=args.skip_nonfinite)
        held = None if args.eval_data is None else vectors.open_vectors(
            args.eval_data, skip_nonfinite=args.skip_nonfinite)
        data = vectors.split(source, held, args.eval_frac)
        info = {"data": {"data": str(args.data),
                         "eval_data": str(args.eval_data) if args.eval_data else None,
                         "eval_frac": args.eval_frac, "n_train": data.train.n}}
        return runner.Data(data.train, data.eval, {"d": data.train.d}, data.train.n, info,
                           str(args.data))

    def train_options(self, args, data):
        if self.start is None:
            return {"feeder": args.feeder}
        return {"feeder": args.feeder, "init": self.start.params,
                "input_scale": self.start.input_scale}

    def summary(self, run_cfg, data, training):
        train, held, scale = data.train, data.test, training.input_scale
        return (f"data {data.name}: {train.n:,} training / {held.n:,} held-out vectors of d = "
                f"{train.d}; {run_cfg.model.hidden:,} latents, {run_cfg.model.arch} "
                f"{run_cfg.label_name}s {list(run_cfg.labels)}; batches "
                f"{'from the device' if training.feeder.mode == 'device' else 'read by a background thread'}"
                f"{f'; inputs scaled by {scale:.4g}' if run_cfg.model.normalize else ''}")

    def metrics(self, run) -> dict:
        metrics = sweep_metrics(run)
        if self.lm_eval is not None and run.result.on_host:
            metrics.update(self.lm_eval(run.result.models(), list(run.cfg.labels)))
        return metrics

    def report(self, run) -> dict:
        metrics = self.metrics(run)
        write_json(run.out / "metrics.json", metrics)
        runner.save(run, metrics, extra={"data": run.data.name})
        if run.result.on_host:  # the figures of the decoder rows need the params here
            write_figures(run, metrics, run.result.models(metrics))
        print_table(run.cfg, metrics)
        print(f"wall time {run.result.seconds:.1f} s ({run.result.compile_seconds:.1f} s compile "
              f"+ first step); outputs in {run.out}")
        return metrics


def sweep_metrics(run: runner.Run) -> dict:
    cfg, result, data = run.cfg, run.result, run.data
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
        "data": data.info.get("data"), "n_train": data.train.n, "n_eval": data.test.n,
        "d": data.train.d,
        "input_scale": result.input_scale, "seconds": result.seconds,
        "compile_seconds": result.compile_seconds, "config": cfg.to_dict(),
    }


def write_figures(run: runner.Run, metrics: dict, sae) -> None:
    cfg, result, out = run.cfg, run.result, run.out
    ks = list(cfg.labels)
    plotting.save(plotting.fvu_vs_k(ks, metrics["fvu"], metrics["dead_frac"], name=cfg.label_name),
                  out / "fvu_vs_k.png")
    plotting.save(plotting.firing_histograms(ks, result.final.counts, result.final.n),
                  out / "firing_freq.png")
    h = metrics["history"]
    plotting.save(plotting.training_curves(ks, h["step"], h["train_fvu"], h["window_dead_frac"]),
                  out / "training_curves.png")
    if cfg.model.d_in == 28 * 28:  # vectors that are images: decoder rows as tiles
        tiles = {}
        for k in sae.labels:
            top = np.argsort(-result.final.counts[cfg.labels.index(k)], kind="stable")[:100]
            tiles[k] = sae.decoder_directions(k)[top].reshape(-1, 28, 28)
        plotting.save(plotting.feature_panels(tiles, "decoder rows of the 100 most used latents"),
                      out / "decoder_tiles.png")


def lm_evaluation(args):
    """The spliced evaluation the --lm flags ask for, set up (a bad model, layer or text: exit 2)."""
    from ksae_jax import lm

    try:
        lm.require()
        from ksae_jax.lm import model as lm_model
        from ksae_jax.lm import splice, text
    except lm.LMUnavailable as e:
        raise cli.UsageError(f"--lm: {e}") from None
    meta = cache_meta(args.data)
    layer = args.layer if args.layer is not None else meta.get("layer")
    if layer is None:
        raise cli.UsageError("--lm: give --layer (no meta.json beside --data says which)")
    try:
        return splice.SpliceEval(args.lm, layer, args.lm_text or meta.get("text", "gcide"),
                                 args.lm_tokens, meta.get("context", 128))
    except (lm_model.LMError, text.TextError, ValueError) as e:
        raise cli.UsageError(f"--lm: {e}") from None


def run_plan(experiment: Sae, args) -> None:
    """--plan: the compiled step's memory, FLOPs and collectives per device, on the mesh the
    flags give; on CPU the devices are forced (in a child process) when there are too few."""
    import os
    import subprocess
    import sys

    import jax

    from ksae_jax import plan, sharding

    try:
        axes = sharding.parse_mesh(args.mesh)
    except ValueError as e:
        raise cli.UsageError(f"--mesh: {e}") from None
    need = int(np.prod(list(axes.values())))
    if jax.device_count() < need and jax.default_backend() == "cpu":
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                                          f"--xla_force_host_platform_device_count={need}"}
        sys.exit(subprocess.run([sys.executable, "-m", "experiments.sae", *sys.argv[1:]],
                                env=env).returncode)
    cfg = runner.build_config(experiment, args, {"d": args.d_in})
    try:
        sharding.check_axes(axes, jax.device_count(), cfg, True)
    except ValueError as e:
        raise cli.UsageError(f"--mesh: {e}") from None
    p = plan.plan(cfg, sharding.make_mesh(axes))
    s = plan.summary(p)
    print(f"plan: {cfg.model.arch} d = {cfg.model.d_in}, n = {cfg.model.hidden:,}, ks "
          f"{list(cfg.labels)}, batch {cfg.batch_size}, mesh {s['mesh']} ({s['devices']} "
          f"devices); per device: arguments {s['arguments_gb']:.2f} GB, outputs "
          f"{s['outputs_gb']:.2f} GB, temporaries {s['temp_gb']:.2f} GB, {s['tflop']:.2f} TFLOP; "
          "collectives " + (", ".join(f"{op} {gb:.3f} GB" for op, gb in
                                      s["collective_gb"].items()) or "none"))
    if args.out is not None:
        from ksae_jax.files import write_json
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "plan.json", {**p, "summary": s})


def print_table(cfg, metrics: dict) -> None:
    lm = "delta_loss" in metrics
    print(f"\n{cfg.label_name:>7} {'FVU':>8} {'MSE':>10} {'L0':>7} {'dead (held-out)':>16} "
          f"{'dead (window)':>14}" + (f" {'delta loss':>11} {'recovered':>10} {'KL':>8}" if lm else ""))
    for i, k in enumerate(cfg.labels):
        if str(k) in metrics["diverged"]:
            print(f"{k!s:>7}  diverged (not saved)")
            continue
        print(f"{k!s:>7} {metrics['fvu'][i]:>8.4f} {metrics['mse'][i]:>10.4g} {metrics['l0'][i]:>7.2f} "
              f"{100 * metrics['dead_frac'][i]:>15.2f}% {100 * metrics['dead_frac_window'][i]:>13.2f}%"
              + (f" {metrics['delta_loss'][i]:>11.4f} {metrics['loss_recovered'][i]:>10.4f} "
                 f"{metrics['kl'][i]:>8.4f}" if lm else ""))
    if "prefix_fvu" in metrics:
        print(f"prefix FVU (latents {', '.join(map(str, cfg.model.prefixes))}): " + "; ".join(
            f"{k}: " + " ".join(f"{v:.4f}" for v in row) for k, row in zip(cfg.labels,
                                                                      metrics["prefix_fvu"])))
    if lm:
        print(f"LM loss (nats/token, {metrics['lm_tokens']:,} held-out predictions): clean "
              f"{metrics['lm_loss_clean']:.4f}, zero-ablated {metrics['lm_loss_zero']:.4f}")


def main(argv=None) -> runner.Run:
    return runner.execute(Sae(), argv)


if __name__ == "__main__":
    runner.main(Sae())
