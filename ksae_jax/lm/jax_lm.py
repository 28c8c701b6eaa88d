"""Causal LMs in JAX, read from a Hugging Face folder's own `config.json` and `*.safetensors`
(no PyTorch at run time): GPT-2, and the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM:
RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention), with each one's differences
read from its config and its weights: rope scaling (linear, llama3), tied or separate output
embeddings, Qwen3's q/k norms, attention and MLP biases (present in the weights or not),
Mistral's sliding window.

The forward is a pure function of the weights (a pytree) and the tokens, so it compiles with
whatever uses it: the live source's buffer, the SAE step, the end-to-end loss. Every
hookpoint is one of its outputs: `resid_post.L` (block L's output), `mlp_in.L` (its MLP's
input, after the norm) and `mlp_out.L` (its MLP's output). Weights keep their file's dtype
(bf16 too); matrix products accumulate in float32, norms and softmax run in float32, and the
logits are float32.

    lm = jax_lm.load("runs/lm")
    logits, acts = lm(tokens, hookpoints=("resid_post.1", "mlp_out.0"))
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax.lm.model import LMError

KINDS = ("resid_post", "mlp_in", "mlp_out", "mlp")  # mlp.L: the pair [mlp_in.L | mlp_out.L]
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "smollm3")


class UnsupportedArchitecture(LMError):
    """A model whose architecture (or a setting of it) has no JAX forward here."""


class WeightsMismatch(LMError):
    """A folder whose safetensors do not match its config.json."""


@dataclasses.dataclass(frozen=True)
class Spec:
    """The shape-defining settings of a model, read from its config.json (static under jit)."""

    kind: str                      # "gpt2" or "llama"
    layers: int
    d: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    act: str                       # the MLP's activation
    ffn: int                       # the MLP's hidden width
    positions: int | None = None   # learnt position embeddings (GPT-2)
    rope_theta: float = 10000.0
    rope: tuple = ()               # rope scaling: () or ("linear", factor) or ("llama3", ...)
    window: tuple = ()             # per layer: sliding window size, or 0 for full attention
    attn_scale_by_layer: bool = False  # GPT-2's scale_attn_by_inverse_layer_idx


def spec_of(config: dict) -> Spec:
    """The Spec of a config.json; UnsupportedArchitecture for anything else."""
    kind = config.get("model_type")
    if kind == "gpt2":
        return _gpt2_spec(config)
    if kind in LLAMA_FAMILY:
        return _llama_spec(config)
    raise UnsupportedArchitecture(f"model_type {kind!r}: JAX forwards exist for gpt2 and "
                                  f"{', '.join(LLAMA_FAMILY)}")


def _gpt2_spec(c: dict) -> Spec:
    d, heads = c["n_embd"], c["n_head"]
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS or not c.get("scale_attn_weights", True):
        raise UnsupportedArchitecture(f"gpt2 with activation {act!r} or unscaled attention")
    return Spec("gpt2", c["n_layer"], d, heads, heads, d // heads, c["vocab_size"],
                c.get("layer_norm_epsilon", 1e-5), act, c.get("n_inner") or 4 * d, positions=c["n_positions"],
                attn_scale_by_layer=bool(c.get("scale_attn_by_inverse_layer_idx", False)))


def _llama_spec(c: dict) -> Spec:
    d, heads, layers = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    rope = dict(c.get("rope_parameters") or {})
    rope.update(c.get("rope_scaling") or {})
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    act = c.get("hidden_act", "silu")
    if act not in ACTIVATIONS or c.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitecture(f"{c['model_type']} with activation {act!r} or partial "
                                      "rotary embeddings")
    return Spec("llama", layers, d, heads, c.get("num_key_value_heads") or heads,
                c.get("head_dim") or d // heads, c["vocab_size"], c.get("rms_norm_eps", 1e-6),
                act, c["intermediate_size"], rope_theta=float(theta), rope=_rope_scaling(rope),
                window=_windows(c, layers))


def _rope_scaling(rope: dict) -> tuple:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return ()
    if kind == "linear":
        return ("linear", float(rope["factor"]))
    if kind == "llama3":
        return ("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                float(rope["high_freq_factor"]), float(rope["original_max_position_embeddings"]))
    raise UnsupportedArchitecture(f"rope scaling {kind!r}: JAX forwards take default, linear "
                                  "and llama3")


def _windows(c: dict, layers: int) -> tuple:
    """Each layer's sliding window (0: full attention): layer_types where the config has them
    (Qwen2, Qwen3), else sliding_window for every layer (Mistral)."""
    window = c.get("sliding_window") or 0
    types = c.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else 0 for t in types)
    if c.get("use_sliding_window") is False:
        return (0,) * layers
    return (window,) * layers


ACTIVATIONS: dict[str, Callable] = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu, "silu": jax.nn.silu, "swish": jax.nn.silu}


# ---------------------------------------------------------------- weights from safetensors

def read_weights(folder: Path, spec: Spec, config: dict, dtype=None) -> dict:
    """The weight pytree of a folder's safetensors (every shard), renamed and laid out for the
    forward (matrices as (in, out)); WeightsMismatch naming the first tensor missing or of the
    wrong shape."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsMismatch(f"{folder}: no *.safetensors files")
    raw = {}
    for f in files:
        raw.update(_load(f))
    w = _build(spec, config, _Reader(raw, folder))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype or a.dtype), w)


def abstract_weights(config: dict, dtype=None):
    """The weight pytree's shapes and dtypes for a config.json alone (jax.ShapeDtypeStruct;
    nothing is allocated): what the compiler's plan needs. dtype: None for the config's
    torch_dtype (float32 where it names none)."""
    spec = spec_of(config)
    dtype = jnp.dtype(dtype or config.get("torch_dtype") or config.get("dtype") or "float32")
    return jax.eval_shape(lambda: _build(spec, config, _Zeros(dtype, _optional(config))))


def _build(spec: Spec, config: dict, get) -> dict:
    """The weight pytree from a reader of tensors by name and shape."""
    tied = config.get("tie_word_embeddings", spec.kind == "gpt2")
    return (_gpt2_weights if spec.kind == "gpt2" else _llama_weights)(get, spec, tied)


def _optional(config: dict) -> tuple[str, ...]:
    """The optional tensors a config implies: attention and MLP biases, q/k norms."""
    kind, out = config.get("model_type"), []
    if config.get("attention_bias") or kind == "qwen2":
        out += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if config.get("attention_bias"):
        out.append("o_proj.bias")
    if config.get("mlp_bias"):
        out += ["gate_proj.bias", "up_proj.bias", "down_proj.bias"]
    if kind == "qwen3":
        out += ["q_norm.weight", "k_norm.weight"]
    return tuple(out)


class _Zeros:
    """A reader of zeros of the shapes asked for (traced under eval_shape)."""

    def __init__(self, dtype, optional: tuple[str, ...]):
        self.dtype, self.optional, self.folder = dtype, optional, "config"

    def __call__(self, name: str, shape: tuple, optional: bool = False):
        if optional and not name.endswith(self.optional):
            return None
        return jnp.zeros(shape, self.dtype)


def _load(path: Path) -> dict:
    """One safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16, read through JAX:
    safetensors' numpy reader refuses it)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except TypeError:
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}


class _Reader:
    """Tensors by name, whatever prefix (transformer., model.) the file puts before them."""

    def __init__(self, raw: dict, folder: Path):
        self.raw, self.folder = raw, folder

    def __call__(self, name: str, shape: tuple, optional: bool = False):
        for prefix in ("", "transformer.", "model.", "model.model."):
            if prefix + name in self.raw:
                got = self.raw[prefix + name]
                if tuple(got.shape) != tuple(shape):
                    raise WeightsMismatch(f"{self.folder}: {prefix}{name} has shape "
                                          f"{tuple(got.shape)}; config.json implies {shape}")
                return got
        if optional:
            return None
        raise WeightsMismatch(f"{self.folder}: its safetensors hold no {name} "
                              f"({len(self.raw)} tensors, e.g. {next(iter(self.raw), None)})")


def _gpt2_weights(get: _Reader, a: Spec, tied: bool) -> dict:
    d, f = a.d, a.ffn

    def block(i):
        p = f"h.{i}."
        qkv, qkv_b = get(p + "attn.c_attn.weight", (d, 3 * d)), get(p + "attn.c_attn.bias",
                                                                      (3 * d,))
        return {"ln1": _ln(get, p + "ln_1", d), "ln2": _ln(get, p + "ln_2", d),
                "q": qkv[:, :d], "k": qkv[:, d:2 * d], "v": qkv[:, 2 * d:],
                "q_b": qkv_b[:d], "k_b": qkv_b[d:2 * d], "v_b": qkv_b[2 * d:],
                "o": get(p + "attn.c_proj.weight", (d, d)), "o_b": get(p + "attn.c_proj.bias", (d,)),
                "up": get(p + "mlp.c_fc.weight", (d, f)), "up_b": get(p + "mlp.c_fc.bias", (f,)),
                "down": get(p + "mlp.c_proj.weight", (f, d)),
                "down_b": get(p + "mlp.c_proj.bias", (d,))}

    embed = get("wte.weight", (a.vocab, d))
    head = embed if tied else get("lm_head.weight", (a.vocab, d))
    return {"embed": embed, "pos": get("wpe.weight", (a.positions, d)),
            "blocks": [block(i) for i in range(a.layers)], "final": _ln(get, "ln_f", d),
            "head": head}


def _ln(get: _Reader, name: str, d: int) -> dict:
    return {"w": get(name + ".weight", (d,)), "b": get(name + ".bias", (d,))}


def _linear(get: _Reader, name: str, n_in: int, n_out: int, out: dict, key: str) -> None:
    """A torch Linear (out, in) as an (in, out) matrix, and its bias where the file has one."""
    out[key] = get(name + ".weight", (n_out, n_in)).T
    bias = get(name + ".bias", (n_out,), optional=True)
    if bias is not None:
        out[key + "_b"] = bias


def _llama_weights(get: _Reader, a: Spec, tied: bool) -> dict:
    d, hd, f = a.d, a.head_dim, a.ffn

    def block(i):
        p, b = f"layers.{i}.", {}
        b["ln1"] = {"w": get(p + "input_layernorm.weight", (d,))}
        b["ln2"] = {"w": get(p + "post_attention_layernorm.weight", (d,))}
        for key, n_out in (("q", a.heads * hd), ("k", a.kv_heads * hd), ("v", a.kv_heads * hd)):
            _linear(get, p + f"self_attn.{key}_proj", d, n_out, b, key)
        _linear(get, p + "self_attn.o_proj", a.heads * hd, d, b, "o")
        for key in ("q_norm", "k_norm"):  # Qwen3
            norm = get(p + f"self_attn.{key}.weight", (hd,), optional=True)
            if norm is not None:
                b[key] = {"w": norm}
        _linear(get, p + "mlp.gate_proj", d, f, b, "gate")
        _linear(get, p + "mlp.up_proj", d, f, b, "up")
        _linear(get, p + "mlp.down_proj", f, d, b, "down")
        return b

    embed = get("embed_tokens.weight", (a.vocab, d))
    head = embed if tied else get("lm_head.weight", (a.vocab, d))
    return {"embed": embed, "blocks": [block(i) for i in range(a.layers)],
            "final": {"w": get("norm.weight", (d,))}, "head": head}


# ---------------------------------------------------------------- the forward

def _acc(dtype):
    """What products accumulate and norms compute in: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _dense(x, p: dict, key: str):
    """x @ p[key] (+ its bias), accumulated in float32, in x's dtype."""
    y = jnp.matmul(x, p[key], preferred_element_type=_acc(x.dtype))
    if key + "_b" in p:
        y = y + p[key + "_b"]
    return y.astype(x.dtype)


def _layer_norm(x, p: dict, eps: float):
    h = x.astype(_acc(x.dtype))
    mean = h.mean(-1, keepdims=True)
    h = (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + eps)
    return (h * p["w"] + p["b"]).astype(x.dtype)


def _rms_norm(x, p: dict, eps: float):
    """Llama's RMSNorm: normalised in float32, cast back, then scaled."""
    h = x.astype(_acc(x.dtype))
    h = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + eps)
    return p["w"] * h.astype(x.dtype)


def _norm(spec: Spec, x, p: dict):
    return (_layer_norm if spec.kind == "gpt2" else _rms_norm)(x, p, spec.eps)


def inv_freq(spec: Spec) -> np.ndarray:
    """The rotary frequencies, with the config's scaling (linear or llama3)."""
    hd = spec.head_dim
    freq = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd)
    if not spec.rope:
        return freq
    if spec.rope[0] == "linear":
        return freq / spec.rope[1]
    factor, low, high, old = spec.rope[1:]
    wavelen = 2 * math.pi / freq
    scaled = np.where(wavelen > old / low, freq / factor, freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    turned = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + turned * sin


def _attention(q, k, v, scale: float, window: int):
    """Causal (and, with a window, sliding) grouped-query attention; scores and softmax in
    float32. q: (B, T, H, hd); k, v: (B, T, KV, hd)."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    acc = _acc(q.dtype)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=acc) * scale
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    allowed = (j <= i) & ((i - j < window) if window else True)
    s = jnp.where(allowed, s, jnp.finfo(acc).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=acc)
    return o.reshape(b, t, h * hd).astype(v.dtype)


def _attend(spec: Spec, p: dict, h, layer: int, rope):
    b, t, _ = h.shape
    q = _dense(h, p, "q").reshape(b, t, spec.heads, spec.head_dim)
    k = _dense(h, p, "k").reshape(b, t, spec.kv_heads, spec.head_dim)
    v = _dense(h, p, "v").reshape(b, t, spec.kv_heads, spec.head_dim)
    if "q_norm" in p:  # Qwen3: RMSNorm over each head before the rotation
        q, k = _rms_norm(q, p["q_norm"], spec.eps), _rms_norm(k, p["k_norm"], spec.eps)
    if rope is not None:
        cos, sin = (r.astype(q.dtype)[:, None] for r in rope)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    scale = spec.head_dim ** -0.5 / ((layer + 1) if spec.attn_scale_by_layer else 1)
    window = spec.window[layer] if spec.window else 0
    return _dense(_attention(q, k, v, scale, window), p, "o")


def _mlp(spec: Spec, p: dict, x):
    act = ACTIVATIONS[spec.act]
    if spec.kind == "gpt2":
        return _dense(act(_dense(x, p, "up")), p, "down")
    return _dense(act(_dense(x, p, "gate")) * _dense(x, p, "up"), p, "down")


Tap = Callable  # (name, activation) -> activation: records it, or replaces it


def block(spec: Spec, p: dict, x, layer: int, rope, tap: Tap):
    """One transformer block, its hookpoints passed through `tap`."""
    x = x + _attend(spec, p, _norm(spec, x, p["ln1"]), layer, rope)
    mlp_in = tap(f"mlp_in.{layer}", _norm(spec, x, p["ln2"]))
    mlp_out = tap(f"mlp_out.{layer}", _mlp(spec, p, mlp_in))
    return tap(f"resid_post.{layer}", x + mlp_out)


def embed(spec: Spec, w: dict, tokens):
    x = w["embed"][tokens]
    if spec.kind == "gpt2":
        x = x + w["pos"][: tokens.shape[1]]
    return x


def rope_tables(spec: Spec, t: int):
    """(cos, sin), each (T, head_dim) float32; None for learnt positions."""
    if spec.kind == "gpt2":
        return None
    freqs = np.arange(t, dtype=np.float32)[:, None] * inv_freq(spec)[None]
    both = np.concatenate([freqs, freqs], axis=-1)
    return jnp.asarray(np.cos(both)), jnp.asarray(np.sin(both))


def unembed(spec: Spec, w: dict, x):
    """(B, T, vocab) float32 logits (float64 for float64 weights)."""
    h = _norm(spec, x, w["final"])
    return jnp.einsum("btd,vd->btv", h, w["head"], preferred_element_type=_acc(h.dtype))


class Output(NamedTuple):
    """What a forward gives: the logits (None when not asked for) and the hookpoints'
    activations, each (B, T, d)."""

    logits: jax.Array | None
    acts: dict


def layers_of(name: str) -> list[int]:
    """The blocks a hookpoint reads: one, or a CLT's several (mlp.0+1+2)."""
    return [int(p) for p in name.rsplit(".", 1)[1].split("+")]


def layer_of(name: str) -> int:
    """The last block a hookpoint reads."""
    return max(layers_of(name))


def tap_width(spec: Spec, name: str) -> int:
    """Width of a hookpoint's activations: d, or 2 d per MLP pair it holds."""
    return spec.d * (2 * len(layers_of(name)) if name.startswith("mlp.") else 1)


def forward(spec: Spec, w: dict, tokens, hookpoints=(), *, logits: bool = True,
            replace: dict | None = None, start: tuple | None = None) -> Output:
    """The model on tokens (B, T): the logits (or, with logits=False, only as far as the last
    hookpoint) and every hookpoint's activations. replace: {hookpoint: fn}, the activation
    there becomes fn(activation) for the rest of the forward (for a pair mlp.L, the MLP's
    output becomes fn(pair): a transcoder's reconstruction). start: (layer, x), the forward
    begun at that block's input instead of the embeddings (the tokens give only T)."""
    replace = replace or {}
    seen: dict = {}

    def tap(name, value):
        seen[name] = value
        pair = f"mlp.{layer_of(name)}"
        if name.startswith("mlp_out.") and pair in replace:  # a transcoder's replacement
            return replace[pair](pair_of(seen, pair))
        return replace[name](value) if name in replace else value

    first, x = start if start is not None else (0, embed(spec, w, tokens))
    wanted = [layer_of(h) for h in (*hookpoints, *replace)]
    last = spec.layers - 1 if logits else max(wanted, default=-1)
    rope = rope_tables(spec, tokens.shape[1])
    for layer in range(first, last + 1):
        seen[f"resid_pre.{layer}"] = x
        x = block(spec, w["blocks"][layer], x, layer, rope, tap)
    acts = {name: jnp.concatenate([pair_of(seen, f"mlp.{layer}") for layer in layers_of(name)], -1)
            if name.startswith("mlp.") else seen[name] for name in hookpoints}
    return Output(unembed(spec, w, x) if logits else None, acts)


def pair_of(seen: dict, pair: str):
    """The pair hookpoint mlp.L: the MLP's input beside its (clean) output, (B, T, 2 d)."""
    layer = layer_of(pair)
    return jnp.concatenate([seen[f"mlp_in.{layer}"], seen[f"mlp_out.{layer}"]], axis=-1)


def output_half(pair):
    """The output half of a pair's activations (what a replacement at the pair writes)."""
    return pair[..., pair.shape[-1] // 2:]


def predictions(logits):
    """Log-probabilities of the predictions made at the positions a splice replaces (1..T-2:
    BOS stays clean, the last position has no target)."""
    return jax.nn.log_softmax(logits[:, 1:-1], axis=-1)


def clean_pass(spec: Spec, w: dict, tokens, tap: str):
    """The clean model's predictions, the hookpoint's activations and its block's input:
    what a spliced pass starts from."""
    block_in = f"resid_pre.{layer_of(tap)}"
    out = forward(spec, w, tokens, (tap, block_in))
    return predictions(out.logits), out.acts[tap], out.acts[block_in]


def spliced_pass(spec: Spec, w: dict, tokens, tap: str, block_in, new):
    """The predictions with the hookpoint's activations at positions 1..T-1 replaced by new
    (B, T - 1, d): only the blocks from the hookpoint's on run."""
    def splice(h):  # at a pair, h is the pair and the MLP's output is replaced
        kept = output_half(h) if tap.startswith("mlp.") else h
        return jnp.concatenate([kept[:, :1], new.astype(h.dtype)], axis=1)

    out = forward(spec, w, tokens, replace={tap: splice}, start=(layer_of(tap), block_in))
    return predictions(out.logits)


def check_hookpoint(spec: Spec, name: str) -> None:
    kind, _, layer = name.rpartition(".")
    several = kind == "mlp" and re.fullmatch(r"\d+(\+\d+)+", layer)  # a CLT's MLPs
    if several and all(int(p) < spec.layers for p in layer.split("+")):
        return
    if kind not in (*KINDS, "resid_pre") or not layer.isdigit() or int(layer) >= spec.layers:
        raise LMError(f"hookpoint {name!r}: the JAX forward has {', '.join(KINDS)} .L for L "
                      f"in 0..{spec.layers - 1}")


# ---------------------------------------------------------------- a loaded model

def module_paths(spec: Spec) -> dict[str, str]:
    """{torch module path: hookpoint} for the modules the torch path can hook whose activation
    the JAX forward gives: each block (its output) and each block's MLP (its output)."""
    blocks = "transformer.h" if spec.kind == "gpt2" else "model.layers"
    paths = {}
    for i in range(spec.layers):
        paths[f"{blocks}.{i}"] = f"resid_post.{i}"
        paths[f"{blocks}.{i}.mlp"] = f"mlp_out.{i}"
    return paths


class JaxLM:
    """A causal LM in JAX: `lm(tokens, hookpoints=(...))` gives (logits, {hookpoint: acts})."""

    def __init__(self, folder: Path, config: dict, spec: Spec, weights: dict):
        self.folder, self.config, self.spec, self.weights = folder, config, spec, weights

    def __call__(self, tokens, hookpoints=(), *, logits: bool = True):
        hookpoints = tuple(hookpoints)
        for name in hookpoints:
            check_hookpoint(self.spec, name)
        out = _forward_jit(self.spec, self.weights, jnp.asarray(tokens, jnp.int32), hookpoints,
                           logits)
        return out.logits, out.acts

    def resolve(self, names) -> list[tuple[str, str]]:
        return resolve(self.spec, names)


def resolve(spec: Spec, names) -> list[tuple[str, str]]:
    """(name as given or as the glob expands it, hookpoint) for hookpoint names and the torch
    module paths the JAX forward covers (block outputs, MLP outputs; globs whose * is one part
    of the path; sparsify's names relative to the base model, h.3); LMError for any other."""
    import fnmatch
    paths = module_paths(spec)
    base = "transformer." if spec.kind == "gpt2" else "model."
    found = []
    for name in names:
        if re.fullmatch(r"(resid_post|mlp_in|mlp_out|mlp)\.\d+|mlp\.\d+(\+\d+)+", name):
            check_hookpoint(spec, name)
            found.append((name, name))
            continue
        glob = "*" in name or "?" in name
        hits = [p for p in paths for pattern in (name, base + name)
                if p.count(".") == pattern.count(".") and fnmatch.fnmatchcase(p, pattern)]
        if not hits:
            raise LMError(f"hookpoint {name!r}: not one the JAX forward gives")
        found += [(p if glob else name, paths[p]) for p in hits]
    return found


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _forward_jit(spec, weights, tokens, hookpoints, logits):
    return forward(spec, weights, tokens, hookpoints, logits=logits)


def read_config(folder) -> dict:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        raise LMError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LMError(f"{path}: not readable JSON ({e})") from None


def load(folder, dtype=None) -> JaxLM:
    """The JAX model of a local Hugging Face folder (config.json and *.safetensors):
    UnsupportedArchitecture for an architecture without a JAX forward, WeightsMismatch when
    the safetensors do not match the config. dtype: the weights' dtype (None: the file's)."""
    folder = Path(folder).expanduser()
    config = read_config(folder)
    spec = spec_of(config)
    return JaxLM(folder, config, spec, read_weights(folder, spec, config, dtype))


def next_token_loss(lm: JaxLM, tokens: np.ndarray, batch: int = 32) -> float:
    """Mean next-token loss (nats) over the targets of tokens (N, T), as
    offline_lm.heldout_loss computes it with the torch model."""
    total, count = 0.0, 0
    for i in range(0, len(tokens), batch):
        part = jnp.asarray(tokens[i:i + batch], jnp.int32)
        total += float(_nll_sum(lm.spec, lm.weights, part))
        count += part.shape[0] * (part.shape[1] - 1)
    return total / count


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(spec, weights, tokens):
    logp = jax.nn.log_softmax(forward(spec, weights, tokens).logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).sum()
