"""`ksae train --model LM --text SOURCE --hookpoints H1 H2 ...`: SAEs for every hookpoint and
every k trained from a running language model, in one compiled program, with no activation
cache (ksae_jax.lm.live). Writes, as sparsify lays out several hookpoints, one folder per
hookpoint (DIR/<hookpoint>/params.pkl, metrics.json and figures, read by ksae_jax.load), and
DIR/metrics.json with every hookpoint's held-out FVU, L0, dead latents (held-out and over the
training window) and the LM's delta_loss and KL with that hookpoint's reconstruction spliced
in, beside tokens, tokens/s and the seconds spent in the LM."""
from __future__ import annotations

import dataclasses
import types

from ksae_jax import flags, runner, sae_run
from ksae_jax.config import Execution, SweepConfig
from ksae_jax.files import write_json

# flags of the other sources, and settings a live run sets itself
NOT_LIVE = {"data": "--data trains from vectors on disk", "eval_data": None, "eval_frac": None,
            "skip_nonfinite": None, "init": None, "lm": "the live model is the LM",
            "layer": "the hookpoints say where", "lm_text": "--text is the text",
            "steps": "--tokens is the budget", "epochs": "--tokens is the budget",
            "normalize": "each hookpoint would need its own scale", "mesh": "one device",
            "distributed": "one device"}


def main(given: dict, values: dict, *, default_out: str) -> runner.Run:
    """The live run: the model, its hookpoints and the text checked before anything is written,
    then training, then the report (see the module docstring)."""
    from ksae_jax.lm.e2e import Objective
    from ksae_jax.lm.live import LiveData

    refuse_other_flags(given)
    live_cfg, objective = flags.build(LiveData, values), flags.build(Objective, values)
    refuse_unused(given, objective)
    live_cfg = hookpoints_of(live_cfg, values)
    lm = open_lm(live_cfg)
    check_hookpoints(lm.names, values)
    d = one_width(lm)
    base = sae_run.sweep_config(values, d, hookpoint=lm.names[0])  # the family's batch size and seed where not given
    if live_cfg.tokens < base.batch_size:
        raise flags.UsageError(f"--tokens {live_cfg.tokens:,} is less than one batch "
                               f"(--batch-size {base.batch_size:,})")
    stream = make_stream(lm, objective, base.batch_size, base.seed)
    cfg = live_sweep(values, base.model, lm.names, live_cfg.tokens // base.batch_size,
                     stream.steps_per_cycle)
    held = heldout_sets(lm)
    print(f"live: {lm.backend.name} {live_cfg.model}, hookpoints {lm.names} (rows {d} wide); "
          + (f"loss {objective.loss}, {stream.contexts} whole contexts a step"
             if objective.end_to_end else
             f"mixing buffer {live_cfg.buffer_tokens:,} rows per hookpoint (half renewed "
             f"every {stream.steps_per_cycle} steps)"))
    info = {"live": dataclasses.asdict(live_cfg), "hookpoints": lm.names,
            **({"objective": dataclasses.asdict(objective)} if objective.end_to_end else {})}
    run = runner.train(cfg, stream, held, flags.build(runner.Output, values),
                       flags.build(runner.RunOptions, values), flags.build(runner.Devices, values),
                       default_out=default_out, summary=lambda t: memory_line(lm, stream, t),
                       run_info={"data": info})
    report(run, lm, held, values.get("lm_tokens", 16_384), info)
    return run


def refuse_other_flags(given: dict) -> None:
    for name, why in NOT_LIVE.items():
        if name in given:
            raise flags.UsageError(f"{flags.flag(name)}: not a setting of a live run (--model)"
                                   + (f": {why}" if why else ""))


def refuse_unused(given: dict, objective) -> None:
    """Settings the objective would not apply."""
    if "kl_coef" in given and objective.loss != "fvu+kl":
        raise flags.UsageError(f"--kl-coef: weighs the KL only in --loss fvu+kl (not "
                               f"{objective.loss})")
    if "buffer_tokens" in given and objective.end_to_end:
        raise flags.UsageError(f"--buffer-tokens: --loss {objective.loss} trains on whole "
                               "contexts, without a mixing buffer")


def make_stream(lm, objective, batch_size: int, seed: int):
    """The mixing buffer's stream, or for an end-to-end loss the whole contexts' (which
    needs the JAX LM and one hookpoint)."""
    from ksae_jax.lm import e2e
    from ksae_jax.lm.live import LiveStream

    if not objective.end_to_end:
        return LiveStream(lm, batch_size, seed)
    if lm.backend.kind != "jax":
        raise flags.UsageError(f"--loss {objective.loss}: needs the LM in JAX (a GPT-2 or "
                               "Llama-family model, --lm-backend auto or jax)")
    if len(lm.names) != 1:
        raise flags.UsageError(f"--loss {objective.loss}: one hookpoint at a time (got "
                               f"{len(lm.names)})")
    try:
        return e2e.ContextStream(lm, batch_size, seed, e2e.spliced_kl(objective, lm.backend))
    except ValueError as e:
        raise flags.UsageError(str(e)) from None


def model_class(values: dict) -> type:
    from ksae_jax.models import registry
    return sae_run.model_classes()[values.get("arch", registry.DEFAULT_SAE)]


def hookpoints_of(live_cfg, values: dict):
    """The live settings with --layers named as the family reads a block."""
    if live_cfg.layers is None:
        return live_cfg
    return dataclasses.replace(live_cfg, layers=None,
                               hookpoints=model_class(values).hookpoints_for(live_cfg.layers))


def check_hookpoints(names: list[str], values: dict) -> None:
    """One line for a hookpoint the family cannot read (a transcoder at a block's output)."""
    for name in names:
        try:
            model_class(values).check_hookpoint(name)
        except ValueError as e:
            raise flags.UsageError(str(e)) from None


def open_lm(live_cfg):
    """The model, hookpoints and text, or one line naming what is wrong."""
    from ksae_jax import lm as lm_pkg

    try:
        lm_pkg.require(torch=live_cfg.lm_backend == "torch")  # else checked if it falls back
        from ksae_jax.lm import live
        from ksae_jax.lm import model as lm_model
        from ksae_jax.lm import text
        try:
            return live.LiveLM(live_cfg)
        except (lm_model.LMError, text.TextError) as e:
            raise flags.UsageError(str(e)) from None
    except lm_pkg.LMUnavailable as e:
        raise flags.UsageError(str(e)) from None


def one_width(lm) -> int:
    widths = lm.widths
    if len(set(widths.values())) > 1:
        raise flags.UsageError(f"--hookpoints of different widths {widths}: the models of one "
                               "run share one d; train them in separate runs")
    return next(iter(widths.values()))


def live_sweep(values: dict, model, hookpoints: list[str], steps: int, cycle: int) -> SweepConfig:
    """The sweep over hookpoints x labels, budgeted by the tokens, evaluating and checkpointing
    between the buffer's cycles (every a multiple of `cycle` steps)."""
    every = values.get("eval_every") or -(-steps // 10)
    every = min(steps, -(-every // cycle) * cycle)
    if values.get("eval_every") not in (None, every):
        print(f"note: --eval-every {values['eval_every']} rounded to {every} (checkpoints fall "
              f"between the mixing buffer's cycles of {cycle} steps)")
    execution = flags.build(Execution, {**values, "eval_every": every})
    return flags.build(SweepConfig, values, model=model, hookpoints=tuple(hookpoints),
                       steps=steps, epochs=None, execution=execution)


def heldout_sets(lm) -> list:
    """Each hookpoint's held-out rows on the device (no host copy kept); refused when they
    do not vary (FVU undefined)."""
    from ksae_jax.data.feed import ArrayRows
    from ksae_jax.data.vectors import check_spread
    from ksae_jax.evaluate import EvalSet

    from ksae_jax.lm.text import TextError

    try:
        held = lm.heldout()
    except TextError as e:
        raise flags.UsageError(str(e)) from None
    for name, rows in zip(lm.names, held):
        check_spread(rows, f"hookpoint {name}")
    return [EvalSet(ArrayRows(rows)) for rows in held]


def memory_estimate(lm, stream, training) -> dict:
    """MB of what a live run holds: the mixing buffer (with the producer's queue and the chunk
    it assembles), the LM's parameters, the SAEs' state (params and Adam's two moments), the
    held-out rows on the device, and the compiled step's workspace (XLA's own count; the
    step is compiled here, once, for the run)."""
    import jax

    cfg = training.cfg
    sae = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(training.state))
    batch = stream.abstract_batch()
    mb = 2 ** 20
    return {"buffer": stream.buffer_bytes() / mb,
            "lm": lm.backend.param_bytes() / mb,
            "sae_state": sae / mb,
            "heldout": len(lm.names) * lm.cfg.heldout_tokens * cfg.model.input_width * 4 / mb,
            "step_workspace": training.compile(batch).memory_analysis().temp_size_in_bytes / mb}


def memory_line(lm, stream, training) -> str:
    parts = memory_estimate(lm, stream, training)
    return (f"memory about {sum(parts.values()) / 1024:.2f} GiB: "
            + ", ".join(f"{name.replace('_', ' ')} {v:,.0f} MB" for name, v in parts.items()))


def folder_name(hookpoint: str) -> str:
    return hookpoint.replace("/", "_")


def report(run: runner.Run, lm, held: list, lm_tokens: int, info: dict) -> dict:
    """Each hookpoint's folder (params.pkl, metrics.json, figures), DIR/metrics.json and the
    printed table."""
    from ksae_jax import sharding

    per_hookpoint, result = {}, run.result
    splice = spliced_evaluation(lm, lm_tokens)
    for h, name in enumerate(run.cfg.hookpoints):
        part = result.for_hookpoint(h)
        sub = runner.Run(part.config, run.out / folder_name(name), run.plan, run.training, part)
        where = {"live": lm.cfg.model, "hookpoint": name}
        rows = types.SimpleNamespace(n=lm.cfg.tokens, d=part.config.model.d_in, name=name)
        metrics = sae_run.sweep_metrics(sub, where, rows, held[h])
        if part.on_host:
            metrics.update(splice(h, part))
        if sharding.is_writer():
            sub.out.mkdir(parents=True, exist_ok=True)
            write_json(sub.out / "metrics.json", metrics)
            runner.save(sub, metrics, extra={"data": f"{lm.cfg.model} {name}"})
            if part.on_host:
                sae_run.write_figures(sub, metrics, part.models(metrics))
        per_hookpoint[name] = {f: metrics.get(f) for f in (
            "ks", "l0_coefs", "fvu", "l0", "dead_frac", "dead_frac_window", "delta_loss", "kl",
            *CLT_FIELDS) if f in metrics}
    seconds = result.seconds
    replaced = replacement(lm, run, splice) if result.on_host else None
    summary = {"hookpoints": per_hookpoint, "tokens": run.result.budget.steps * run.cfg.batch_size,
               "tokens_per_s": run.result.budget.steps * run.cfg.batch_size / seconds,
               "lm_seconds": lm.seconds, "seconds": seconds, **run.plan,
               "compile_seconds": result.compile_seconds, "config": run.cfg.to_dict(),
               "lm_backend": lm.backend.kind, "data": info,
               **({"replacement": replaced} if replaced else {})}
    if sharding.is_writer():
        write_json(run.out / "metrics.json", summary)
        print_table(run.cfg, per_hookpoint, summary)
    return summary


CLT_FIELDS = ("layer_fvu", "layer_l0", "layer_delta_loss", "layer_kl", "replacement_delta_loss",
              "replacement_kl")


def spliced_evaluation(lm, lm_tokens: int):
    """(h, result) -> the LM's loss with each SAE of hookpoint h spliced in (delta_loss, KL,
    ...), on held-out contexts tokenized once for every hookpoint; at a CLT's hookpoint
    (several MLPs), each layer replaced alone and every layer at once (lm.replacement)."""
    from ksae_jax.lm import hookpoints, replacement
    from ksae_jax.lm.splice import SpliceEval

    evaluation = SpliceEval.at(lm.backend.splice, lm.tokenizer, lm.hookpoints[0], lm.held_docs, lm_tokens,
                               lm.cfg.context, name=lm.cfg.model)

    def scores(h: int, part) -> dict:
        where, labels = lm.hookpoints[h], list(part.config.labels)
        if hookpoints.is_several(where):
            return replacement.clt_scores(lm.backend.splice, evaluation.windows,
                                          evaluation.nbytes, part.models(), where.path, labels)
        evaluation.where, evaluation.layer = where, where.name
        return evaluation(part.models(), labels)

    scores.evaluation = evaluation
    return scores


def replacement(lm, run: runner.Run, splice) -> dict | None:
    """Every layer's transcoder spliced in at once (the replacement model), where a run of
    the JAX LM trained transcoders at several MLPs; None otherwise."""
    from ksae_jax.lm import hookpoints, replacement as rep

    pairs = [h for h, where in enumerate(lm.hookpoints) if hookpoints.is_pair(where)]
    if lm.backend.kind != "jax" or len(pairs) < 2:
        return None
    ev = splice.evaluation
    trained = [(lm.hookpoints[h].path, run.result.for_hookpoint(h).models()) for h in pairs]
    return rep.transcoders_replacement(lm.backend.splice, ev.windows, ev.nbytes, trained,
                                       list(run.cfg.labels))


def print_table(cfg: SweepConfig, per_hookpoint: dict, summary: dict) -> None:
    name = cfg.label_name
    print(f"\n{'hookpoint':>16} {name:>7} {'FVU':>8} {'L0':>7} {'dead (held-out)':>16} "
          f"{'dead (window)':>14} {'delta loss':>11} {'KL':>8}")
    for hookpoint, m in per_hookpoint.items():
        for i, label in enumerate(m[name + "s"]):
            lm_part = (f" {m['delta_loss'][i]:>11.4f} {m['kl'][i]:>8.4f}"
                       if m.get("delta_loss") and m["delta_loss"][i] is not None else "")
            print(f"{hookpoint:>16} {label!s:>7} {m['fvu'][i]:>8.4f} {m['l0'][i]:>7.2f} "
                  f"{100 * m['dead_frac'][i]:>15.2f}% {100 * m['dead_frac_window'][i]:>13.2f}%"
                  + lm_part + (" (every layer replaced)" if "layer_fvu" in m else ""))
            for j, layer in enumerate(hookpoint.split(".", 1)[1].split("+") if "layer_fvu" in m
                                      else ()):
                alone = (f" {m['layer_delta_loss'][i][j]:>11.4f} {m['layer_kl'][i][j]:>8.4f}"
                         if m.get("layer_delta_loss") else "")
                print(f"{'  layer ' + layer:>16} {'':>7} {m['layer_fvu'][i][j]:>8.4f} "
                      f"{m['layer_l0'][i][j]:>7.2f} {'':>16} {'':>14}{alone}")
    if "replacement" in summary:
        r = summary["replacement"]
        print("every layer's transcoder at once (the replacement model): " + ", ".join(
            f"{name} {label}: delta loss {d:.4f}, KL {kl:.4f}" for label, d, kl in zip(
                r["labels"], r["replacement_delta_loss"], r["replacement_kl"])))
    share = ("the LM's forward and backward passes inside the compiled step"
             if "objective" in summary["data"] else
             f"{100 * summary['lm_seconds'] / summary['seconds']:.0f}% of the time in the LM's "
             "forward passes")
    print(f"{summary['tokens']:,} tokens at {summary['tokens_per_s']:,.0f} tokens/s "
          f"({summary['lm_backend']}), {share}; {summary['seconds']:.1f} s in all")
