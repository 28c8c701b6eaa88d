"""The offline language model: a byte-level BPE tokenizer trained on the text with
`tokenizers`, and a small GPT-2 (`transformers.GPT2LMHeadModel` from a config, random init)
trained on it with AdamW in torch; saved with `save_pretrained` so that any Hugging Face
loader (and `ksae cache`) reads it as a local folder."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from ksae_jax.lm import text

EOS = "<|endoftext|>"  # GPT-2's one special token: document separator and BOS


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """The offline LM (a GPT-2 from a config) and its training run."""

    layers: int = 4
    """Transformer blocks."""
    d_model: int = 256
    """Width of the residual stream."""
    heads: int = 4
    """Attention heads (d_model must be a multiple)."""
    context: int = 128
    """Tokens per window, BOS included."""
    vocab: int = 4096
    """Tokens of the byte-level BPE trained on the text."""
    batch_size: int = 32
    """Windows per step."""
    steps: int = 400
    """AdamW steps."""
    lr: float = 2e-3
    """AdamW peak learning rate: linear warmup, then cosine to a tenth."""
    warmup: int = 30
    """Steps of the linear warmup."""
    weight_decay: float = 0.1
    """AdamW's weight decay."""
    seed: int = 0
    """Init and the windows drawn."""
    eval_windows: int = 128
    """Held-out windows for the reported loss."""
    text: str = text.DEFAULT
    """'gcide' (apt-get install dict-gcide), a UTF-8 text file or a folder of .txt."""

    def __post_init__(self):
        for name in ("layers", "d_model", "heads", "context", "vocab", "batch_size", "steps",
                     "eval_windows"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of heads {self.heads}")


def train_tokenizer(docs: list[str], vocab: int):
    """Byte-level BPE (GPT-2's scheme) trained on docs, as a transformers fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab, min_frequency=2, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                   unk_token=EOS, model_max_length=1 << 20)


def token_stream(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents' tokens, each document followed by EOS, as one int32 array."""
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return np.fromiter((t for doc in ids for t in (*doc, eos)), np.int32)


def windows(stream: np.ndarray, starts: np.ndarray, context: int, bos: int) -> np.ndarray:
    """(len(starts), context): BOS, then context - 1 tokens of the stream from each start."""
    body = stream[starts[:, None] + np.arange(context - 1)]
    return np.concatenate([np.full((len(starts), 1), bos, np.int32), body], axis=1)


def _byte_symbols() -> set[str]:
    """The 256 printable characters byte-level BPE (GPT-2's) writes the bytes 0..255 as."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [256 + i for i in range(256 - len(printable))]
    return {chr(c) for c in printable + others}


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for: exact for byte-level BPE vocabularies (one symbol
    per byte), by decoding otherwise; special tokens (EOS: a document break) count one byte."""
    symbols, special = _byte_symbols(), set(tokenizer.all_special_tokens)
    vocab = tokenizer.get_vocab()
    byte_level = all(set(t) <= symbols for t in vocab if t not in special)
    out = np.ones(len(tokenizer), np.int64)
    for tok, i in vocab.items():
        if tok not in special and i < len(out):
            out[i] = len(tok) if byte_level else max(1, len(tokenizer.decode([i]).encode()))
    return out


def build_model(cfg: LMConfig, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=cfg.context, n_embd=cfg.d_model,
                        n_layer=cfg.layers, n_head=cfg.heads, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def heldout_loss(model, tokens: np.ndarray, nbytes: np.ndarray, batch: int = 32) -> dict:
    """Mean next-token loss (nats) over the targets of `tokens` (N, T), and bits per byte."""
    import torch

    nll, count, total_bytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(tokens), batch):
            x = torch.from_numpy(tokens[i:i + batch]).long()
            logits = model(x).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:],
                                                       reduction="none")
            nll += float(losses.sum())
            count += losses.numel()
            total_bytes += int(nbytes[tokens[i:i + batch, 1:]].sum())
    model.train()
    return {"loss": nll / count, "bits_per_byte": nll / math.log(2) / total_bytes, "tokens": count}


def _schedule(cfg: LMConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def train(cfg: LMConfig, out: Path, *, docs: list[str] | None = None, progress: bool = True,
          log=print) -> dict:
    """Tokenizer + GPT-2 trained on cfg.text (or its documents `docs`, already read); both
    saved in `out` with save_pretrained, and the run's summary in out/train_lm.json."""
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    train_docs, held_docs = text.split(docs if docs is not None else text.documents(cfg.text))
    tok = train_tokenizer(train_docs, cfg.vocab)
    stream, held = token_stream(tok, train_docs), token_stream(tok, held_docs)
    nbytes = token_bytes(tok)
    n_eval = min(cfg.eval_windows, (len(held) - 1) // (cfg.context - 1))
    if n_eval < 1 or len(stream) <= cfg.context:
        raise text.TextError(f"{cfg.text}: too little text for contexts of {cfg.context} tokens")
    eval_tokens = windows(held, np.arange(n_eval) * (cfg.context - 1), cfg.context, tok.bos_token_id)
    log(f"text {cfg.text}: {len(train_docs):,} training documents ({len(stream):,} tokens), "
        f"{len(held_docs):,} held out; tokenizer {len(tok):,} tokens")
    model = build_model(cfg, len(tok))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(cfg, s))
    rng = np.random.default_rng(cfg.seed)
    curve = []
    for step in tqdm(range(cfg.steps), disable=not progress, desc="LM", unit="step"):
        starts = rng.integers(0, len(stream) - cfg.context, cfg.batch_size)
        x = torch.from_numpy(windows(stream, starts, cfg.context, tok.bos_token_id)).long()
        loss = model(x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(float(loss.detach()))
    result = heldout_loss(model, eval_tokens, nbytes)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    summary = {"config": dataclasses.asdict(cfg), "params": sum(p.numel() for p in model.parameters()),
               "train_tokens": len(stream), "tokens_seen": cfg.steps * cfg.batch_size * cfg.context,
               "heldout": result, "train_loss_curve": curve[::10] + curve[-1:],
               "seconds": time.perf_counter() - t0}
    (out / "train_lm.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def run(cfg: LMConfig, out: Path, docs: list[str], progress: bool = True) -> dict:
    """`ksae lm`: trains the offline LM on every core into out, and says how it went."""
    import os

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    s = train(cfg, out, docs=docs, progress=progress)
    h = s["heldout"]
    print(f"{s['params']:,} parameters, {s['tokens_seen']:,} tokens seen; held-out loss "
          f"{h['loss']:.4f} nats/token = {h['bits_per_byte']:.4f} bits per byte over "
          f"{h['tokens']:,} tokens; {s['seconds'] / 60:.1f} min; saved in {out}")
    return s
