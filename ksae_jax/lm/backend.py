"""The two ways a live run runs its language model, behind one interface: in JAX (the forward
of ksae_jax.lm.jax_lm, compiled with whatever reads it: no PyTorch at run time, any JAX
device, TPUs included) or in PyTorch (any Hugging Face causal LM, its activations handed to
JAX through DLPack). `open_backend` picks JAX where the architecture and the hookpoints have
a JAX forward, else PyTorch with one printed line; `lm_backend` forces either.

A backend gives the tokenizer, the resolved hookpoints (hookpoints.Hookpoint: the name as
given, and where the activation is read), `rows(ids)`: every hookpoint's rows of a batch of
contexts, BOS dropped, as one (hookpoints, B * (T - 1), d) float32 JAX array; its weights'
bytes; and `splice`, the model as the spliced evaluation runs it."""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from ksae_jax.lm import hookpoints as hooks
from ksae_jax.lm import jax_lm
from ksae_jax.lm import model as lm_model

BACKENDS = ("auto", "jax", "torch")
TOKENIZER_FILES = ["config.json", "*.safetensors", "*.json", "*.txt", "*.model"]


def open_backend(model: str, hookpoints, choice: str = "auto", log=print):
    """The backend that runs `model` with these hookpoint names (None: every block's output)."""
    if choice not in BACKENDS:
        raise lm_model.LMError(f"--lm-backend {choice!r}: one of {', '.join(BACKENDS)}")
    if choice != "torch":
        try:
            return JaxBackend(model, hookpoints)
        except jax_lm.UnsupportedArchitecture as e:
            if choice == "jax":
                raise
            log(f"note: {e}; the LM runs in PyTorch")
    return TorchBackend(model, hookpoints)


def _every_block(n: int) -> list[str]:
    return [f"resid_post.{i}" for i in range(n)]


@functools.partial(jax.jit, static_argnums=3)
def assemble(carry, have, rows, size: int):
    """(chunk, new carry) of row_chunks: `size` rows from the carried pass's last `have` rows
    on through rows (hookpoints, P * per_pass, d); the new carry is the last pass's rows."""
    per_pass = carry.shape[1]
    joined = jnp.concatenate([carry, rows], axis=1)
    chunk = jax.lax.dynamic_slice_in_dim(joined, per_pass - have, size, axis=1)
    return chunk, rows[:, -per_pass:]


@jax.jit
def _drop_bos(stacked):
    """(hookpoints, B, T, d) -> (hookpoints, B * (T - 1), d) float32."""
    h, b, t, d = stacked.shape
    return stacked[:, :, 1:].reshape(h, b * (t - 1), d).astype(jnp.float32)


class TorchBackend:
    """The model in PyTorch (on the GPU when JAX's backend is one), read through hooks."""

    kind = "torch"
    prefetch = 1  # its passes run in a producer thread, beside the JAX step

    def __init__(self, model: str, names):
        from ksae_jax import lm as lm_pkg
        lm_pkg.require()
        self.model, self.tokenizer = lm_model.load(model)
        if jax.default_backend() == "gpu":  # the LM beside the SAEs, activations by DLPack
            self.model.to("cuda")
        self.hookpoints = hooks.resolve(
            self.model, names or _every_block(self.model.config.num_hidden_layers))
        self.name = type(self.model).__name__

    def check_context(self, context: int) -> None:
        lm_model.check_context(self.model, context)

    def _capture(self, ids) -> dict:
        import torch
        return hooks.capture(self.model, self.hookpoints,
                             torch.from_numpy(ids).long().to(self.model.device))

    def widths(self, ids) -> dict[str, int]:
        return {name: int(a.shape[-1]) for name, a in self._capture(ids).items()}

    def rows(self, ids):
        got = self._capture(ids)
        return _drop_bos(jnp.stack([jax.dlpack.from_dlpack(got[h.name].float().contiguous())
                                    for h in self.hookpoints]))

    def chunk(self, carry, have: int, ids, size: int):
        """row_chunks' chunk: the passes one by one, then the assembly."""
        rows = jnp.concatenate([self.rows(pass_ids) for pass_ids in ids], axis=1)
        return assemble(carry, have, rows, size)

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def splice(self):
        return self.model


class JaxBackend:
    """The model in JAX (jax_lm); UnsupportedArchitecture where it has no JAX forward, or a
    hookpoint is not one of the JAX forward's outputs."""

    kind = "jax"
    prefetch = 0  # its chunk program queues on the device with the step

    def __init__(self, model: str, names):
        from transformers import AutoTokenizer

        folder = local_folder(model)
        self.lm = jax_lm.load(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        try:
            pairs = self.lm.resolve(names or _every_block(self.lm.spec.layers))
        except lm_model.LMError as e:
            raise jax_lm.UnsupportedArchitecture(str(e)) from None
        self.hookpoints = [hooks.Hookpoint(name, tap, "jax") for name, tap in pairs]
        hooks.check_unique(self.hookpoints)
        self.name = f"{self.lm.config.get('architectures', ['?'])[0]} (JAX)"

    def check_context(self, context: int) -> None:
        positions = self.lm.spec.positions
        if positions is not None and context > positions:
            raise lm_model.LMError(f"--context {context}: the model takes at most {positions} "
                                   "positions")

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(h.path for h in self.hookpoints)

    def widths(self, ids) -> dict[str, int]:
        return {h.name: jax_lm.tap_width(self.lm.spec, h.path) for h in self.hookpoints}

    def rows(self, ids):
        return _jax_rows(self.lm.spec, self.lm.weights, jnp.asarray(ids, jnp.int32), self.taps)

    def chunk(self, carry, have: int, ids, size: int):
        """row_chunks' chunk: the passes and the assembly in one compiled program."""
        return _jax_chunk(self.lm.spec, self.lm.weights, carry, jnp.int32(have),
                          jnp.asarray(ids, jnp.int32), self.taps, size)

    def param_bytes(self) -> int:
        return sum(a.nbytes for a in jax.tree.leaves(self.lm.weights))

    @property
    def splice(self):
        return self.lm


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jax_rows(spec, weights, ids, taps):
    """Every hookpoint's rows of one forward pass (stopped after the last hookpoint)."""
    acts = jax_lm.forward(spec, weights, ids, taps, logits=False).acts
    return _drop_bos(jnp.stack([acts[t] for t in taps]))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _jax_chunk(spec, weights, carry, have, ids, taps, size):
    """The forward passes of ids (P, B, T), one after another (lax.map: one pass's
    activations live at a time), and the chunk assembled from them and the carry."""
    rows = jax.lax.map(lambda one: _jax_rows(spec, weights, one, taps), ids)  # (P, H, n, d)
    rows = jnp.moveaxis(rows, 0, 1).reshape(rows.shape[1], -1, rows.shape[-1])
    return assemble(carry, have, rows, size)


def local_folder(model: str) -> Path:
    """A local model folder, or a hub name's files fetched into the cache (with network)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")):
        raise lm_model.LMError(f"{model}: no such model folder")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, allow_patterns=TOKENIZER_FILES))
    except Exception as e:  # noqa: BLE001 - any hub failure: one line
        raise lm_model.LMError(f"{model}: not a local folder, and the hub gave "
                               f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
