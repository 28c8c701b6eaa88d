"""Softmax classifiers on raw pixels or k-sparse features, vmapped over models, and
supervised fine-tuning of encoder + classifier (Makhzani & Frey's evaluation)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ksae_jax import models
from ksae_jax.config import ModelConfig
from ksae_jax.data.feed import EpochOrder, gather
from ksae_jax.topk import sparsify

N_CLASSES = 10


def init_linear(n_in: int, n_models: int, n_classes: int = N_CLASSES) -> dict:
    """Zero-initialised softmax regressions, one per model (leading axis)."""
    return {"weight": jnp.zeros((n_models, n_classes, n_in)), "bias": jnp.zeros((n_models, n_classes))}


def features(x, enc_params, n_active, *, cfg: ModelConfig | None, max_k: int):
    """Classifier inputs: raw pixels (cfg None), or the code with n_active units kept."""
    if cfg is None:
        return x.reshape(x.shape[0], -1)
    dense, _ = models.bind(cfg, enc_params).encode_dense(x)
    return sparsify(dense, n_active, max_k)


def _padded(order: np.ndarray, batch_size: int) -> jax.Array:
    return jnp.asarray(np.concatenate([order, np.full(-len(order) % batch_size, -1)]), jnp.int32)


def gather_batch(images, labels, order, i, batch_size: int) -> dict:
    """Batch i of `order` (padded with -1): pixels in [0, 1], labels, weights."""
    batch = gather(images, order, i, 1 / 255, batch_size=batch_size)
    return {**batch, "y": labels[jnp.maximum(jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,)), 0)]}


def _logits(params, x, n_active, *, cfg, max_k):
    f = features(x, params.get("enc"), n_active, cfg=cfg, max_k=max_k)
    return f @ params["cls"]["weight"].T + params["cls"]["bias"]


def _xent(trainable, frozen, batch, n_active, *, cfg, max_k):
    logits = _logits({**frozen, **trainable}, batch["x"], n_active, cfg=cfg, max_k=max_k)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * batch["w"]) / jnp.maximum(batch["w"].sum(), 1.0)


def _split(state: dict, finetune: bool):
    """(trainable, frozen): the classifier alone, or with the encoder when fine-tuning."""
    if finetune:
        return state, {}
    return {"cls": state["cls"]}, {k: v for k, v in state.items() if k != "cls"}


@functools.partial(jax.jit, static_argnames=("cfg", "max_k", "lr", "batch_size", "finetune"),
                   donate_argnames=("state", "opt_state"))
def classifier_step(state, opt_state, images, labels, order, i, n_active, *, cfg, max_k: int,
                    lr: float, batch_size: int, finetune: bool):
    """One Adam step of every model's classifier (and encoder when finetune)."""
    batch = gather_batch(images, labels, order, i, batch_size)
    tx = optax.adam(lr)

    def one(state, opt_state, n_active):
        trainable, frozen = _split(state, finetune)
        grads = jax.grad(_xent)(trainable, frozen, batch, n_active, cfg=cfg, max_k=max_k)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return {**state, **optax.apply_updates(trainable, updates)}, opt_state

    return jax.vmap(one)(state, opt_state, n_active)


def fit(state: dict, images, labels, n_active, *, cfg: ModelConfig | None, max_k: int,
        epochs: int, lr: float, batch_size: int = 600, seed: int = 0, finetune: bool = False,
        progress: bool = True, desc: str = "classifier") -> dict:
    """Trains the classifiers in `state` ({"cls": ..., "enc": ...}, leading model axis).

    Returns the new state; the arrays passed in are left intact (the steps donate copies).
    """
    state = jax.tree.map(jnp.array, state)
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    n_active = jnp.asarray(n_active, jnp.int32)
    tx = optax.adam(lr)
    opt_state = jax.vmap(lambda s: tx.init(_split(s, finetune)[0]))(state)
    n = images.shape[0]
    n_batches = -(-n // batch_size)
    step = functools.partial(classifier_step, cfg=cfg, max_k=max_k, lr=lr, batch_size=batch_size,
                             finetune=finetune)
    with tqdm(total=epochs * n_batches, disable=not progress, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            order = _padded(EpochOrder(n, seed, epoch).rows(0, n), batch_size)
            for i in range(n_batches):
                state, opt_state = step(state, opt_state, images, labels, order, i, n_active)
                bar.update()
    return state


@functools.partial(jax.jit, static_argnames=("cfg", "max_k", "batch_size"))
def _n_errors(state, images, labels, order, i, n_active, *, cfg, max_k, batch_size):
    batch = gather_batch(images, labels, order, i, batch_size)

    def one(params, n_active):
        pred = jnp.argmax(_logits(params, batch["x"], n_active, cfg=cfg, max_k=max_k), axis=-1)
        return jnp.sum((pred != batch["y"]) * batch["w"])

    return jax.vmap(one)(state, n_active)


def error_rate(state: dict, images, labels, n_active, *, cfg: ModelConfig | None, max_k: int,
               batch_size: int = 1000) -> np.ndarray:
    """Per-model classification error (%) on images/labels."""
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    n_active = jnp.asarray(n_active, jnp.int32)
    n = images.shape[0]
    order = _padded(np.arange(n), batch_size)
    errors = sum(_n_errors(state, images, labels, order, i, n_active, cfg=cfg, max_k=max_k,
                           batch_size=batch_size) for i in range(-(-n // batch_size)))
    return 100.0 * np.asarray(errors) / n
