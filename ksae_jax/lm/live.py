"""A running language model as the SAEs' data: nothing is cached. Text is tokenized on the fly
and packed into contexts; each forward pass reads every hookpoint at once (and stops after the
last one needed), in JAX or in PyTorch (lm.backend; from torch the activations reach JAX
through DLPack); a mixing buffer per hookpoint, on the device, shuffles rows of many contexts
together before they form batches. With the LM in JAX, a buffer cycle's forward passes and
their assembly are one compiled program, and the SAE step draws its batch from the buffer
itself: tokens go in, and nothing comes back to the host before the update.

Contexts are built as the activation caches build them: BOS, then context - 1 tokens of the
stream of documents joined by EOS; the BOS position is dropped (its activation is an outlier
the SAE would spend latents on), so each context gives context - 1 rows. The training
documents are read in a seeded order (a new order each time the text runs out), the held-out
documents (every 100th, never trained on) in their own order.

The mixing buffer (SAELens's, in place on the device): `buffer_tokens` rows per hookpoint.
Each cycle draws its batches from the slots in the first half of a seeded permutation (the
same for every hookpoint, so a batch holds the same tokens at every hookpoint); the next cycle
first refills those slots with new rows, while the second half stays. A checkpoint taken
between cycles holds that kept half; the stream's position follows from the step, so a run
resumes bit for bit.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import checks
from ksae_jax.data.feed import ArrayRows, offer
from ksae_jax.lm import model as lm_model
from ksae_jax.lm.backend import BACKENDS, open_backend
from ksae_jax.lm import offline_lm, text

DOCS_PER_CHUNK = 256  # documents tokenized at a time


@dataclasses.dataclass(frozen=True)
class LiveData:
    """A running causal LM as the data: its activations at the hookpoints, read from every
    forward pass over text tokenized on the fly (nothing is written to disk)."""

    model: str | None = None
    """A Hugging Face causal LM, run live: a local folder, or a hub name (with network)."""
    text: str = text.DEFAULT
    """'gcide' (apt-get install dict-gcide), a UTF-8 .txt file or folder of them, a .jsonl
    file (its "text" fields), or a datasets name or save_to_disk folder."""
    hookpoints: tuple[str, ...] | None = None
    """Module paths (transformer.h.3, globs such as transformer.h.*) or resid_post.L,
    mlp_in.L, mlp_out.L (None: every block's output)."""
    layers: tuple[int, ...] | None = None
    """Blocks to read, instead of --hookpoints, as the family reads a block: its output
    (resid_post.L) for SAEs, its MLP's input and output (mlp.L) for transcoders."""
    tokens: int = 2_097_152
    """Training tokens (rows per hookpoint); the budget of the run."""
    heldout_tokens: int = 65_536
    """Held-out tokens per hookpoint, from the text's held-out documents."""
    context: int = 128
    """Tokens per context, BOS included."""
    lm_batch: int = 32
    """Contexts per forward pass."""
    buffer_tokens: int = 131_072
    """Rows of the mixing buffer per hookpoint (half of it is renewed each cycle)."""
    lm_backend: Literal["auto", "jax", "torch"] = "auto"
    """Run the LM in 'jax' (GPT-2 and the Llama family, from the folder's safetensors), in
    'torch' (any architecture), or 'auto': JAX where the architecture has a JAX forward."""

    def __post_init__(self):
        if not self.model:
            raise ValueError("model: give the causal LM to run (a folder or a hub name)")
        for name in ("tokens", "heldout_tokens", "context", "lm_batch", "buffer_tokens"):
            checks.positive_int(name, getattr(self, name))
        if self.context < 2:
            raise ValueError("context must be at least 2 (BOS and one token)")
        if self.hookpoints is not None and self.layers is not None:
            raise ValueError("give --hookpoints or --layers, not both")
        for name in ("hookpoints", "layers"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.lm_backend not in BACKENDS:
            raise ValueError(f"lm_backend must be one of {', '.join(BACKENDS)}, got "
                             f"{self.lm_backend!r}")


def contexts(tokenizer, docs: list[str], context: int, bos: int, seed: int | None,
             start: int = 0) -> Iterator[np.ndarray]:
    """Context after context (int32, BOS first) from context number `start` on: the documents
    in a seeded order (seed None: in order, once), tokenized DOCS_PER_CHUNK at a time, joined by
    EOS and cut into windows of context - 1 tokens."""
    per, count, epoch = context - 1, 0, 0
    while True:
        order = (np.arange(len(docs)) if seed is None
                 else np.random.default_rng([seed, epoch]).permutation(len(docs)))
        carry, before = np.zeros(0, np.int32), count
        for i in range(0, len(docs), DOCS_PER_CHUNK):
            carry = np.concatenate([carry, offline_lm.token_stream(
                tokenizer, [docs[j] for j in order[i:i + DOCS_PER_CHUNK]])])
            n = len(carry) // per
            for w in range(n):
                if count >= start:
                    yield np.concatenate([[bos], carry[w * per:(w + 1) * per]]).astype(np.int32)
                count += 1
            carry = carry[n * per:]
        if seed is None:
            return
        if count == before:
            raise text.TextError(f"the text gives no context of {context} tokens")
        epoch += 1


class LiveLM:
    """The model (run by a lm.backend), its hookpoints and the text: forward passes that give
    every hookpoint's rows."""

    def __init__(self, cfg: LiveData, log=print):
        self.cfg = cfg
        self.backend = open_backend(cfg.model, cfg.hookpoints, cfg.lm_backend, log)
        self.tokenizer, self.hookpoints = self.backend.tokenizer, self.backend.hookpoints
        self.backend.check_context(cfg.context)
        self.bos = lm_model.bos_id(self.tokenizer)
        self.train_docs, self.held_docs = text.split(text.documents(cfg.text))
        next(self.train_contexts(seed=0))  # TextError now for a text too short for a context
        self.seconds = 0.0  # time spent in forward passes
        self.widths = self.backend.widths(np.full((1, 2), self.bos, np.int32))

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hookpoints]

    def forward(self, ids: np.ndarray) -> jax.Array:
        """(hookpoints, B * (T - 1), d) float32 rows of contexts (B, T), BOS dropped."""
        return self._timed(self.backend.rows, ids)

    def chunk(self, carry, have: int, ids: np.ndarray, size: int):
        """(chunk, new carry): `size` rows, the last `have` rows of `carry` (the last pass's
        rows) first, then those of the passes ids (P, B, T); the new carry is the last
        pass's rows."""
        return self._timed(self.backend.chunk, carry, have, ids, size)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds += time.perf_counter() - t0
        return out

    def train_contexts(self, seed: int, start: int = 0) -> Iterator[np.ndarray]:
        return contexts(self.tokenizer, self.train_docs, self.cfg.context, self.bos, seed, start)

    def heldout(self) -> np.ndarray:
        """(hookpoints, heldout_tokens, d) rows of the held-out documents' first contexts (of
        one width: the run checks the hookpoints' widths first)."""
        per = self.cfg.context - 1
        need = -(-self.cfg.heldout_tokens // per)
        held = contexts(self.tokenizer, self.held_docs, self.cfg.context, self.bos, None)
        windows = list(itertools.islice(held, need))
        if len(windows) < need:
            raise text.TextError(f"{self.cfg.text}: its held-out documents give "
                                 f"{len(windows) * per:,} tokens; --heldout-tokens asks for "
                                 f"{self.cfg.heldout_tokens:,}")
        rows = np.empty((len(self.hookpoints), need * per, self.widths[self.names[0]]),
                        np.float32)
        for i in range(0, need, self.cfg.lm_batch):
            part = self.forward(np.stack(windows[i:i + self.cfg.lm_batch]))
            rows[:, i * per:i * per + part.shape[1]] = np.asarray(part)
        return rows[:, :self.cfg.heldout_tokens]


def row_chunks(lm: LiveLM, seed: int, start_row: int, size: int) -> Iterator[jax.Array]:
    """Consecutive (hookpoints, size, d) chunks of the training rows from row `start_row` on.
    Forward passes always take the same lm_batch contexts, so any row is computed the same
    way whatever the start. Each chunk is one call of the backend's `chunk`: the forward
    passes it needs and the chunk's assembly (with the JAX LM, one compiled program); the
    rows of a pass that a chunk leaves over are carried to the next."""
    per_pass = lm.cfg.lm_batch * (lm.cfg.context - 1)
    first_pass, skip = divmod(start_row, per_pass)
    ctx = lm.train_contexts(seed, first_pass * lm.cfg.lm_batch)
    carry = jnp.zeros((len(lm.names), per_pass, lm.widths[lm.names[0]]), jnp.float32)
    have = 0  # the carried pass's last `have` rows are still to be given
    if skip:
        carry, have = lm.forward(_take(ctx, 1, lm.cfg.lm_batch)[0]), per_pass - skip
    while True:
        passes = max(0, -(-(size - have) // per_pass))
        if passes:
            chunk, carry = lm.chunk(carry, have, _take(ctx, passes, lm.cfg.lm_batch), size)
        else:  # chunks smaller than a pass: the carried rows suffice
            chunk = _carried(carry, have, size)
        have += passes * per_pass - size
        yield chunk


@functools.partial(jax.jit, static_argnums=2)
def _carried(carry, have, size: int):
    return jax.lax.dynamic_slice_in_dim(carry, carry.shape[1] - have, size, axis=1)


def _take(ctx: Iterator[np.ndarray], passes: int, lm_batch: int) -> np.ndarray:
    """(passes, lm_batch, T) contexts."""
    ids = np.stack(list(itertools.islice(ctx, passes * lm_batch)))
    return ids.reshape(passes, lm_batch, -1)


def cycle_steps(buffer_tokens: int, batch_size: int) -> int:
    """Batches each cycle of the mixing buffer gives: half the buffer (at least one batch)."""
    return max(1, buffer_tokens // 2 // batch_size)


def _perm(seed: int, cycle: int, rows: int) -> jax.Array:
    return jax.random.permutation(jax.random.fold_in(jax.random.key(seed), cycle), rows)


@functools.partial(jax.jit, donate_argnums=0)
def _refill(buffer, slots, new):
    return buffer.at[:, slots].set(new)


@jax.jit
def _draw(buffer, slots):
    return buffer[:, slots]


class MixingBuffer:
    """SAELens's mixing buffer, in place on the device: `rows` slots per hookpoint. Cycle c
    draws its batches from the slots in a seeded permutation's first half; at the start of the
    next cycle those slots take new rows and the permutation's second half stays. Between
    cycles the state is the kept half; a buffer rebuilt from it continues bit for bit."""

    def __init__(self, seed: int, rows: int, batch_size: int):
        self.seed, self.rows, self.batch_size, self.half = seed, rows, batch_size, rows // 2
        self.buffer, self.cycle, self.perm = None, 0, None

    def start(self, first: jax.Array, second: jax.Array) -> None:
        """Cycle 0's buffer: the first two chunks of rows."""
        self.buffer, self.cycle = jnp.concatenate([first, second], axis=1), 0
        self.perm = _perm(self.seed, 0, self.rows)

    def resume(self, cycle: int, kept: jax.Array, new: jax.Array) -> None:
        """Cycle c's buffer from the half kept at the end of cycle c - 1 and the new rows."""
        slots = _perm(self.seed, cycle - 1, self.rows)
        empty = jnp.zeros(kept.shape[:1] + (self.rows,) + kept.shape[2:], kept.dtype)
        self.buffer = _refill(_refill(empty, slots[self.half:], kept), slots[:self.half], new)
        self.cycle, self.perm = cycle, _perm(self.seed, cycle, self.rows)

    def next_cycle(self, new: jax.Array) -> None:
        """The drawn half replaced by new rows; the next permutation."""
        self.buffer = _refill(self.buffer, self.perm[:self.half], new)
        self.cycle += 1
        self.perm = _perm(self.seed, self.cycle, self.rows)

    def slots(self, i: int) -> jax.Array:
        """The slots batch i of the current cycle draws."""
        return self.perm[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, i: int) -> jax.Array:
        """Batch i of the current cycle: (hookpoints, B, d)."""
        return _draw(self.buffer, self.slots(i))

    def kept(self) -> jax.Array:
        """What a checkpoint between cycles holds: the half the next cycle keeps."""
        return _draw(self.buffer, self.perm[self.half:])


class LiveStream:
    """The training loop's batches from the running model, through the mixing buffer:
    {"buffer": (hookpoints, rows, d), "slots": (B,), "w"}, the step drawing the rows. With
    the torch LM a producer thread runs the forward passes ahead (a bounded queue of one
    chunk), so that they overlap the SAE step where the device allows; the JAX LM's chunk is
    one more program in the device's queue (two XLA programs at once on 2 CPU cores fight
    for them: 3x slower passes, measured)."""

    mode = "live"

    def __init__(self, lm: LiveLM, batch_size: int, seed: int, prefetch: int | None = None):
        """prefetch: chunks the producer thread makes ahead (None: the backend's choice; 0:
        no thread, each chunk made when the buffer needs it)."""
        self.lm, self.batch_size, self.seed = lm, batch_size, seed
        self.prefetch = lm.backend.prefetch if prefetch is None else prefetch
        self.steps_per_cycle = cycle_steps(lm.cfg.buffer_tokens, batch_size)
        self.half = self.steps_per_cycle * batch_size
        self.n = lm.cfg.tokens
        self.d = lm.widths[lm.names[0]]
        self.mixer = MixingBuffer(seed, 2 * self.half, batch_size)
        self.first, self.restored = None, None

    def buffer_bytes(self) -> int:
        """What the buffer holds at most, for every hookpoint: its two halves, the producer's
        queue, the chunk being assembled, and a checkpoint's copy of the kept half."""
        return (2 + self.prefetch + 1 + 1) * len(self.lm.names) * self.half * self.d * 4

    def first_rows(self) -> jax.Array:
        """The first half buffer of training rows (read once: what the models initialise from)."""
        if self.first is None:
            self.first = next(row_chunks(self.lm, self.seed, 0, self.half))
        return self.first

    def init_rows(self, h: int) -> ArrayRows:
        """Hookpoint h's first training rows (what the models initialise from)."""
        return ArrayRows(np.asarray(self.first_rows()[h]))

    def abstract(self) -> dict:
        """The shapes of what a checkpoint holds of the stream."""
        return {"kept": jax.ShapeDtypeStruct((len(self.lm.names), self.half, self.d),
                                             jnp.float32)}

    def saved(self) -> dict:
        """The checkpoint's part: the half of the buffer the next cycle keeps."""
        return {"kept": self.mixer.kept()}

    def restore(self, saved: dict) -> None:
        self.restored = saved["kept"]

    def abstract_batch(self) -> dict:
        return {"buffer": jax.ShapeDtypeStruct((len(self.lm.names), 2 * self.half, self.d),
                                               jnp.float32),
                "slots": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32),
                "w": jax.ShapeDtypeStruct((self.batch_size,), jnp.float32)}

    def _produce(self, first_chunk: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            for chunk in row_chunks(self.lm, self.seed, self.half * first_chunk, self.half):
                if not offer(out, chunk, stop):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, unless it left
            offer(out, e, stop)

    def batches(self, start_step: int = 0) -> Iterator[dict]:
        """Batches from step start_step on (a multiple of steps_per_cycle: where the
        checkpoints are taken, the kept half given to `restore`)."""
        if start_step % self.steps_per_cycle:
            raise ValueError(f"a live run resumes between cycles of {self.steps_per_cycle} steps")
        cycle = start_step // self.steps_per_cycle
        with self._new_rows(cycle + 1) as new_rows:
            if cycle == 0:
                self.mixer.start(self.first_rows(), new_rows())
                self.first = None
            else:
                self.mixer.resume(cycle, self.restored, new_rows())
                self.restored = None
            w = jnp.ones(self.batch_size, jnp.float32)
            while True:
                for i in range(self.steps_per_cycle):  # the step draws the rows itself
                    yield {"buffer": self.mixer.buffer, "slots": self.mixer.slots(i), "w": w}
                self.mixer.next_cycle(new_rows())

    @contextlib.contextmanager
    def _new_rows(self, first_chunk: int):
        """A function giving chunk after chunk from `first_chunk` on: made by a producer
        thread ahead of the loop (prefetch > 0), or when asked for."""
        if not self.prefetch:
            chunks = row_chunks(self.lm, self.seed, self.half * first_chunk, self.half)
            yield lambda: next(chunks)
            return
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(first_chunk, out, stop),
                                  daemon=True)
        worker.start()

        def new_rows():
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            return item

        try:
            yield new_rows
        finally:
            stop.set()
            worker.join(timeout=30)
