"""Activation caches for the SAEs: a causal LM's residual stream after block L on English
text (or, with mlp_pairs, block L's MLP input beside its output: the rows a transcoder trains
on), written as .npy shards (DIR/train/, DIR/heldout/) and DIR/meta.json.

Contexts are `context` tokens: BOS, then context - 1 tokens of the token stream (documents
joined by EOS). The BOS position is dropped (its residual is an outlier the SAE would spend
latents on, as SAELens and sparsify leave it out), so every context gives context - 1 rows.
Training contexts are non-overlapping windows drawn at random from the training documents'
stream (seeded); held-out contexts are consecutive windows of the held-out documents (every
100th document, never trained on by the offline LM). The cache is a pure function of its
settings: a cache killed midway resumes from its last whole shard when rerun with the same
settings, and is refused with any other. DIR/heldout_windows.npy holds the held-out
contexts' token ids (row r of heldout/ is token r % (context - 1) + 1 of context
r // (context - 1)), for looking at features in their text.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import numpy as np

from ksae_jax.files import atomic_write, write_json
from ksae_jax.lm import hookpoints as hooks
from ksae_jax.lm import model as lm_model
from ksae_jax.lm import offline_lm, text

PROGRESS, META, HELD_WINDOWS = ".progress.json", "meta.json", "heldout_windows.npy"


class CacheError(ValueError):
    """A cache folder that holds something else, or settings that cannot be met."""


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """An activation cache: which model, which block, how many tokens of which text."""

    model: str
    """A Hugging Face causal LM: a local folder or a hub name."""
    layer: int
    """Block L: its output (resid_post) is cached."""
    tokens: int
    """Training activations (rows) to write."""
    mlp_pairs: bool = False
    """Cache block L's MLP input beside its output instead (the pair hookpoint mlp.L, 2 d
    wide: what `ksae train --arch transcoder` trains on)."""
    heldout_tokens: int = 65_536
    """Held-out activations, from the text's held-out documents."""
    context: int = 128
    """Tokens per context, BOS included."""
    text: str = text.DEFAULT
    """'gcide' (apt-get install dict-gcide), a UTF-8 text file or a folder of .txt."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shard_tokens: int = 262_144
    """Rows per .npy shard."""
    seed: int = 0
    """Which training contexts are drawn."""

    def __post_init__(self):
        for name in ("tokens", "heldout_tokens", "context", "batch_size", "shard_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.context < 2:
            raise ValueError("context must be at least 2 (BOS and one token)")


def residuals(model, layer: int, tokens: np.ndarray, mlp_pairs: bool = False):
    """(B, T, d) float32 residual stream after block `layer` (with mlp_pairs: (B, T, 2 d), its
    MLP's input beside its output) for token ids (B, T); the later blocks are not run."""
    import torch

    where = hooks.resolve(model, [hookpoint_name(layer, mlp_pairs)])[0]
    return hooks.capture(model, [where], torch.from_numpy(tokens).long())[where.name].float().numpy()


def hookpoint_name(layer: int, mlp_pairs: bool) -> str:
    return f"mlp.{layer}" if mlp_pairs else f"resid_post.{layer}"


def _streams(cfg: CacheConfig, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    train_docs, held_docs = text.split(text.documents(cfg.text))
    return offline_lm.token_stream(tokenizer, train_docs), offline_lm.token_stream(tokenizer, held_docs)


def plan_windows(cfg: CacheConfig, stream: np.ndarray, rows: int, shuffled: bool) -> np.ndarray:
    """Start positions of the contexts that give `rows` activations (context - 1 each)."""
    per = cfg.context - 1
    n_windows = -(-rows // per)
    available = (len(stream) - 1) // per
    if n_windows > available:
        raise CacheError(f"the text gives {available * per:,} rows of context {cfg.context}; "
                         f"{rows:,} were asked for")
    if shuffled:
        starts = np.random.default_rng(cfg.seed).choice(available, n_windows, replace=False)
    else:
        starts = np.arange(n_windows)
    return starts * per


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _prepare_folder(out: Path, cfg: CacheConfig, overwrite: bool) -> int:
    """Shards already written by an interrupted cache with the same settings (0 if new)."""
    settings = dataclasses.asdict(cfg)
    if (out / META).exists() and not overwrite:
        raise CacheError(f"{out}: holds a complete cache already (pass --overwrite to redo it)")
    progress = out / PROGRESS
    if progress.exists() and not overwrite:
        saved = json.loads(progress.read_text())
        if saved["settings"] != settings:
            diff = [k for k in settings if saved["settings"].get(k) != settings[k]]
            raise CacheError(f"{out}: holds a half-written cache made with other settings "
                             f"({', '.join(diff)}); rerun with the same ones to resume, or pass "
                             "--overwrite")
        return int(saved["train_shards"])
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CacheError(f"{out}: folder is not empty (pass --overwrite to replace it)")
    for old in list(out.glob("*/*.npy")) + [out / META, out / HELD_WINDOWS, progress]:
        old.unlink(missing_ok=True)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(exist_ok=True)
    write_json(progress, {"settings": settings, "train_shards": 0})
    return 0


def _write_split(model, cfg, stream, starts, rows: int, folder: Path, first_shard: int, bos: int,
                 on_shard, bar) -> None:
    """Shards of `rows` activations from the contexts at `starts`, from shard first_shard on;
    on_shard(n) after the n-th shard is written."""
    per = cfg.context - 1
    windows_per_shard = cfg.shard_tokens // per
    for shard in range(first_shard, -(-len(starts) // windows_per_shard)):
        chunk = starts[shard * windows_per_shard:(shard + 1) * windows_per_shard]
        parts = []
        for i in range(0, len(chunk), cfg.batch_size):
            ids = offline_lm.windows(stream, chunk[i:i + cfg.batch_size], cfg.context, bos)
            acts = residuals(model, cfg.layer, ids, cfg.mlp_pairs)[:, 1:]  # BOS dropped
            parts.append(acts.reshape(-1, acts.shape[-1]))
            bar.update(acts.shape[0] * acts.shape[1])
        block = np.concatenate(parts)
        end = min(rows - shard * windows_per_shard * per, len(block))
        _save_npy(folder / f"{shard:05d}.npy", np.ascontiguousarray(block[:end], np.float32))
        on_shard(shard + 1)


def build(cfg: CacheConfig, out: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the cache of cfg to `out` (resuming an interrupted one); returns its meta.json."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    model, tokenizer = lm_model.load(cfg.model)
    lm_model.check_layer(model, cfg.layer)
    lm_model.check_context(model, cfg.context)
    train_stream, held_stream = _streams(cfg, tokenizer)
    train_starts = plan_windows(cfg, train_stream, cfg.tokens, shuffled=True)
    held_starts = plan_windows(cfg, held_stream, cfg.heldout_tokens, shuffled=False)
    out = Path(out)
    done = _prepare_folder(out, cfg, overwrite)

    def on_shard(n):
        write_json(out / PROGRESS, {"settings": dataclasses.asdict(cfg), "train_shards": n})

    bos = lm_model.bos_id(tokenizer)
    per_shard = cfg.shard_tokens // (cfg.context - 1) * (cfg.context - 1)
    t_acts = time.perf_counter()
    with tqdm(total=cfg.tokens + cfg.heldout_tokens, initial=min(done * per_shard, cfg.tokens),
              unit="tok", unit_scale=True, disable=not progress, desc="activations") as bar:
        _write_split(model, cfg, train_stream, train_starts, cfg.tokens, out / "train", done,
                     bos, on_shard, bar)
        _write_split(model, cfg, held_stream, held_starts, cfg.heldout_tokens, out / "heldout", 0,
                     bos, lambda n: None, bar)
    _save_npy(out / HELD_WINDOWS, offline_lm.windows(held_stream, held_starts, cfg.context, bos))
    meta = _meta(cfg, model, tokenizer, len(train_stream), time.perf_counter() - t0,
                 time.perf_counter() - t_acts)
    write_json(out / META, meta)
    (out / PROGRESS).unlink()
    return meta


def _meta(cfg: CacheConfig, model, tokenizer, stream_tokens: int, seconds: float,
          acts_seconds: float) -> dict:
    return {
        "model": cfg.model, "architecture": type(model).__name__, "layer": cfg.layer,
        "hookpoint": hookpoint_name(cfg.layer, cfg.mlp_pairs),
        "hook": (f"the MLP of block {cfg.layer}: its input beside its output" if cfg.mlp_pairs else
                 f"resid_post of block {cfg.layer} (the output of transformer block {cfg.layer})"),
        "d": int(model.config.hidden_size), "context": cfg.context,
        "bos": "every context starts with BOS (id %d); its position is dropped" % lm_model.bos_id(tokenizer),
        "tokenizer": {"name_or_path": str(getattr(tokenizer, "name_or_path", cfg.model)),
                      "vocab_size": len(tokenizer)},
        "text": cfg.text, "train_tokens": cfg.tokens, "heldout_tokens": cfg.heldout_tokens,
        "train_stream_tokens": stream_tokens, "seed": cfg.seed, "dtype": "float32",
        "settings": dataclasses.asdict(cfg), "seconds": seconds,
        "tokens_per_s": (cfg.tokens + cfg.heldout_tokens) / acts_seconds,
    }


def run(cfg: CacheConfig, out: Path, overwrite: bool = False, progress: bool = True) -> dict:
    """`ksae cache`: builds the cache on every core, and says what it wrote."""
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    meta = build(cfg, out, overwrite=overwrite, progress=progress)
    print(f"{meta['train_tokens']:,} training and {meta['heldout_tokens']:,} held-out activations "
          f"of d = {meta['d']} ({meta['hook']}) in {out}; {meta['tokens_per_s']:,.0f} tokens/s, "
          f"{meta['seconds']:.0f} s in all")
    return meta
