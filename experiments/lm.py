"""Language models for the SAE workload: train the offline GPT-2, or cache a model's
residual stream as activation shards for experiments.sae.

    python -m experiments.lm train --out runs/lm                  # ~15 min on 2 CPU cores
    python -m experiments.lm cache --model runs/lm --layer 2 --tokens 2000000 --out runs/acts
    python -m experiments.lm evaluate --sae runs/sae/params.pkl --model runs/lm --layer 2

Needs the lm extra: pip install -r requirements-lm.txt.
"""
from __future__ import annotations

import os
from pathlib import Path

from ksae_jax import cli, lm


def _train_flags(p) -> None:
    from ksae_jax.lm.offline_lm import LMConfig

    base = LMConfig()
    p.add_argument("--out", type=Path, default=Path("runs/lm"), help="model folder (default runs/lm)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--text", default=base.text,
                   help="'gcide' (apt-get install dict-gcide), a UTF-8 text file or a folder of .txt")
    p.add_argument("--steps", type=cli.positive_int, default=base.steps)
    p.add_argument("--batch-size", type=cli.positive_int, default=base.batch)
    p.add_argument("--layers", type=cli.positive_int, default=base.layers)
    p.add_argument("--d-model", type=cli.positive_int, default=base.d_model)
    p.add_argument("--heads", type=cli.positive_int, default=base.heads)
    p.add_argument("--context", type=cli.positive_int, default=base.context)
    p.add_argument("--vocab", type=cli.positive_int, default=base.vocab)
    p.add_argument("--lr", type=cli.positive_float, default=base.lr)
    p.add_argument("--seed", type=cli.int_value, default=base.seed)
    p.add_argument("--no-progress", action="store_true")


def train(args) -> None:
    import torch

    from ksae_jax.lm import offline_lm, text

    if args.d_model % args.heads:
        raise cli.UsageError(f"--d-model {args.d_model} is not a multiple of --heads {args.heads}")
    cfg = offline_lm.LMConfig(layers=args.layers, d_model=args.d_model, heads=args.heads,
                              context=args.context, vocab=args.vocab, batch=args.batch_size,
                              steps=args.steps, lr=args.lr, seed=args.seed, text=args.text)
    docs = text.documents(args.text)  # a missing or empty text: refused before anything is written
    out = cli.prepare_out_dir(args.out, args.overwrite)
    torch.set_num_threads(os.cpu_count() or 1)
    s = offline_lm.train(cfg, out, docs=docs, progress=not args.no_progress)
    h = s["heldout"]
    print(f"{s['params']:,} parameters, {s['tokens_seen']:,} tokens seen; held-out loss "
          f"{h['loss']:.4f} nats/token = {h['bits_per_byte']:.4f} bits per byte over "
          f"{h['tokens']:,} tokens; {s['seconds'] / 60:.1f} min; saved in {out}")


def _cache_flags(p) -> None:
    from ksae_jax.lm.cache import CacheConfig

    base = CacheConfig(model="", layer=0, tokens=1)
    p.add_argument("--model", required=True, help="a Hugging Face causal LM: local folder or hub name")
    p.add_argument("--layer", type=cli.int_value, required=True,
                   help="block L: its output (resid_post) is cached")
    p.add_argument("--tokens", type=cli.positive_int, required=True, help="training activations")
    p.add_argument("--heldout-tokens", type=cli.positive_int, default=base.heldout_tokens)
    p.add_argument("--context", type=cli.positive_int, default=base.context,
                   help=f"tokens per context, BOS included (default {base.context})")
    p.add_argument("--text", default=base.text,
                   help="'gcide' (apt-get install dict-gcide), a UTF-8 text file or a folder of .txt")
    p.add_argument("--batch-size", type=cli.positive_int, default=base.batch,
                   help="contexts per forward pass")
    p.add_argument("--shard-tokens", type=cli.positive_int, default=base.shard_tokens)
    p.add_argument("--seed", type=cli.int_value, default=base.seed)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def cache(args) -> None:
    import torch

    from ksae_jax.lm import cache as lm_cache

    if args.context < 2:
        raise cli.UsageError("--context must be at least 2 (BOS and one token)")
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = lm_cache.CacheConfig(model=args.model, layer=args.layer, tokens=args.tokens,
                               heldout_tokens=args.heldout_tokens, context=args.context,
                               text=args.text, batch=args.batch_size,
                               shard_tokens=args.shard_tokens, seed=args.seed)
    meta = lm_cache.build(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"{meta['train_tokens']:,} training and {meta['heldout_tokens']:,} held-out activations "
          f"of d = {meta['d']} ({meta['hook']}) in {args.out}; {meta['tokens_per_s']:,.0f} tokens/s, "
          f"{meta['seconds']:.0f} s in all")


def _evaluate_flags(p) -> None:
    p.add_argument("--sae", type=Path, required=True,
                   help="a trained SAE: params.pkl, a ksae_jax export, or a sparsify / SAELens folder")
    p.add_argument("--model", required=True, help="the causal LM of its activations")
    p.add_argument("--layer", type=cli.int_value, required=True, help="the block it reads")
    p.add_argument("--text", default="gcide", help="text whose held-out documents are evaluated")
    p.add_argument("--tokens", type=cli.positive_int, default=16_384, help="predictions evaluated")
    p.add_argument("--context", type=cli.positive_int, default=128)
    p.add_argument("--out", type=Path, default=None, help="write the metrics here (.json)")


def evaluate(args) -> None:
    """The spliced evaluation of a saved SAE (every k it holds), as experiments.sae --lm."""
    import torch

    from ksae_jax import inference
    from ksae_jax.files import write_json
    from ksae_jax.formats import ParamsFileError
    from ksae_jax.lm import splice

    torch.set_num_threads(os.cpu_count() or 1)
    try:
        sae = inference.load(args.sae)
    except (ParamsFileError, OSError) as e:
        raise cli.UsageError(f"--sae {args.sae}: {e}") from None
    ev = splice.SpliceEval(args.model, args.layer, args.text, args.tokens, args.context)
    labels = list(sae.ks)
    m = ev(sae, labels)
    print(f"clean {m['lm_loss_clean']:.4f}, zero-ablated {m['lm_loss_zero']:.4f} nats/token over "
          f"{m['lm_tokens']:,} tokens\n{'k':>6} {'delta loss':>11} {'recovered':>10} {'KL':>8}")
    for i, k in enumerate(labels):
        print(f"{k:>6} {m['delta_loss'][i]:>11.4f} {m['loss_recovered'][i]:>10.4f} {m['kl'][i]:>8.4f}")
    if args.out is not None:
        write_json(args.out, {"sae": str(args.sae), "ks": labels, **m})


def main(argv=None):
    p = cli.Parser(prog="python -m experiments.lm", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    _train_flags(sub.add_parser("train", help="train the offline GPT-2 on English text"))
    _cache_flags(sub.add_parser("cache", help="cache a model's residual stream as .npy shards"))
    _evaluate_flags(sub.add_parser("evaluate", help="a saved SAE's LM loss with its "
                                                    "reconstruction spliced in"))
    args = p.parse_args(argv)
    try:
        lm.require()
    except lm.LMUnavailable as e:
        raise cli.UsageError(str(e)) from None
    from ksae_jax.lm.cache import CacheError
    from ksae_jax.lm.model import LMError
    from ksae_jax.lm.text import TextError

    try:
        {"train": train, "cache": cache, "evaluate": evaluate}[args.command](args)
    except (CacheError, LMError, TextError, ValueError) as e:
        raise cli.UsageError(str(e)) from None


if __name__ == "__main__":
    cli.run(main)
