"""Transcoders and CLTs spliced into the JAX LM, several MLPs at once: the MLP outputs of the
replaced layers are computed by the coders from the MLP inputs the spliced model itself
produces as it runs (so a replaced layer sees the earlier replacements' effects). With one
layer replaced this is the single-layer splice; with every layer replaced it is the
replacement model of circuit tracing. BOS keeps its clean output.

A `Coder` says how a trained model reads the LM: its family, static top-k width, and the
blocks its rows span (a transcoder: its own; a CLT: every layer it was trained on), whose
rows [input | output] are built from the inputs seen so far (a CLT's later layers, not yet
run, are zeros: its decoders are causal, so the replaced layer's output does not read them).
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax.lm import jax_lm


class Coder(NamedTuple):
    """A trained transcoder or CLT, as the replaced forward runs it (hashable: static)."""

    family: Any
    max_k: int
    span: tuple[int, ...]  # the LM blocks its rows hold, in order


def coder_of(models, hookpoint: str, label) -> tuple[Coder, dict, dict]:
    """(Coder, params, hp) of the model `label` of a loaded sweep trained at `hookpoint`
    (mlp.L or mlp.L1+L2+...). The static top-k width is the sweep's largest k (k itself is
    traced, in hp), so every model of the sweep runs in the same compiled program."""
    i = models.index(label)
    hp, _ = models.hp(i)
    max_k = max(models.ks) if models.ks else None
    return (Coder(models.family, max_k, tuple(jax_lm.layers_of(hookpoint))),
            jax.tree.map(jnp.asarray, models.params_for(label)), hp)


def _outputs(coder: Coder, params, hp, ins: dict, layer: int, d: int):
    """The coder's reconstruction of block `layer`'s MLP output (B, T, d) from the inputs."""
    b, t = next(iter(ins.values())).shape[:2]
    zeros = jnp.zeros((b, t, d), jnp.float32)
    rows = jnp.concatenate([part for l in coder.span for part in
                            (ins.get(l, zeros).astype(jnp.float32), zeros)], -1)
    rows = rows.reshape(b * t, -1)
    out = coder.family.forward(params, rows, jnp.ones(b * t), hp, coder.max_k, terms=False)
    j = coder.span.index(layer)
    return out.recon.reshape(b, t, -1)[..., j * d:(j + 1) * d]


@functools.partial(jax.jit, static_argnums=(0, 4))
def replaced_logprobs(spec, weights, tokens, params, coders: tuple):
    """Log-probabilities (as jax_lm.predictions) with block m's MLP output replaced by
    coders[i] for each (m, i) of the static `coders`: ((layer, Coder), ...); params[i] and
    the hps ride in `params` as (params, hp) pairs."""
    ins: dict = {}

    def record(layer):
        def fn(value):
            ins[layer] = value
            return value
        return fn

    def replace(layer, i):
        coder, (p, hp) = coders[i][1], params[i]

        def fn(value):
            new = _outputs(coder, p, hp, ins, layer, spec.d).astype(value.dtype)
            return jnp.concatenate([value[:, :1], new[:, 1:]], axis=1)
        return fn

    taps = {f"mlp_in.{layer}": record(layer) for layer in range(spec.layers)}
    taps |= {f"mlp_out.{layer}": replace(layer, i) for i, (layer, _) in enumerate(coders)}
    return jax_lm.predictions(jax_lm.forward(spec, weights, tokens, replace=taps).logits)


def losses(lm, windows: np.ndarray, nbytes: np.ndarray, variants: dict, batch: int = 16) -> dict:
    """spliced_losses's fields for each variant {name: [(layer, (Coder, params, hp)), ...]}
    (every listed layer replaced at once), over the targets 2..T-1 of the windows."""
    from ksae_jax.lm.splice import accumulate

    clean_fn = jax.jit(lambda w, ids: jax_lm.predictions(jax_lm.forward(lm.spec, w, ids).logits))

    def passes(ids):
        ids = jnp.asarray(ids, jnp.int32)
        out = {}
        for name, replaced in variants.items():
            coders = tuple((layer, c[0]) for layer, c in replaced)
            params = tuple((c[1], c[2]) for _, c in replaced)
            out[name] = np.asarray(replaced_logprobs(lm.spec, lm.weights, ids, params, coders))
        return np.asarray(clean_fn(lm.weights, ids)), out

    return accumulate(windows, nbytes, passes, batch)


def _scores(got: dict, name: str) -> dict:
    return {"delta_loss": got[name]["loss"] - got["clean"]["loss"], "kl": got[name]["kl"]}


def clt_scores(lm, windows, nbytes, models, hookpoint: str, labels) -> dict:
    """A CLT's spliced metrics per label: each layer's MLP replaced alone (layer_delta_loss,
    layer_kl: one value per layer) and every layer at once (replacement_delta_loss,
    replacement_kl, also its delta_loss and kl)."""
    layers = jax_lm.layers_of(hookpoint)
    variants = {}
    for label in labels:
        coder = coder_of(models, hookpoint, label)
        variants[f"{label}/all"] = [(m, coder) for m in layers]
        variants |= {f"{label}/{m}": [(m, coder)] for m in layers}
    got = losses(lm, windows, nbytes, variants)
    every = [_scores(got, f"{label}/all") for label in labels]
    each = [[_scores(got, f"{label}/{m}") for m in layers] for label in labels]
    return {"lm_loss_clean": got["clean"]["loss"], "lm_tokens": got["tokens"],
            "replacement_delta_loss": [s["delta_loss"] for s in every],
            "replacement_kl": [s["kl"] for s in every],
            "delta_loss": [s["delta_loss"] for s in every], "kl": [s["kl"] for s in every],
            "layer_delta_loss": [[s["delta_loss"] for s in row] for row in each],
            "layer_kl": [[s["kl"] for s in row] for row in each]}


def transcoders_replacement(lm, windows, nbytes, trained: list, labels) -> dict:
    """The replacement model of per-layer transcoders: every layer's MLP replaced at once by
    its transcoder of each label; trained: [(hookpoint mlp.L, loaded sweep), ...]."""
    variants = {str(label): [(jax_lm.layer_of(h), coder_of(models, h, label))
                             for h, models in trained] for label in labels}
    got = losses(lm, windows, nbytes, variants)
    return {"labels": list(labels), "layers": [h for h, _ in trained],
            "replacement_delta_loss": [_scores(got, str(label))["delta_loss"] for label in labels],
            "replacement_kl": [_scores(got, str(label))["kl"] for label in labels]}
