"""Makhzani & Frey's evaluation: softmax classifiers on raw pixels or on k-sparse codes
(alpha * k units kept), vmapped over models. A frozen-feature classifier is trained to
convergence (full-batch L-BFGS, L2 weight chosen on a validation split); fine-tuning trains
encoder and classifier together with Adam, starting from it."""
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
    idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
    return {**batch, "y": labels[jnp.maximum(idx, 0)]}


# ---------------------------------------------------------------- frozen features, L-BFGS

@functools.partial(jax.jit, static_argnames=("cfg", "max_k", "batch_size"))
def _feature_batch(enc, images, order, i, n_active, *, cfg, max_k, batch_size):
    x = gather(images, order, i, 1 / 255, batch_size=batch_size)["x"]
    return jax.vmap(lambda p, n: features(x, p, n, cfg=cfg, max_k=max_k))(enc, n_active)


def encode_all(enc, images, n_active, *, cfg: ModelConfig | None, max_k: int,
               batch_size: int = 2000) -> jax.Array:
    """(models, N, features): every model's classifier inputs for all images (uint8)."""
    images = jnp.asarray(images)
    n = images.shape[0]
    n_active = jnp.asarray(n_active, jnp.int32)
    order = _padded(np.arange(n), batch_size)
    enc = enc if cfg is not None else jnp.zeros(n_active.shape)
    parts = [_feature_batch(enc, images, order, i, n_active, cfg=cfg, max_k=max_k,
                            batch_size=batch_size) for i in range(order.shape[0] // batch_size)]
    return jnp.concatenate(parts, axis=1)[:, :n]


def _objective(w, f, y, l2):
    logits = f @ w["weight"].T + w["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(w["weight"]))


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _lbfgs(f, y, l2, max_iter: int):
    w = {"weight": jnp.zeros((N_CLASSES, f.shape[1])), "bias": jnp.zeros(N_CLASSES)}
    fun = functools.partial(_objective, f=f, y=y, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry, _):
        w, state = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=fun)
        return (optax.apply_updates(w, updates), state), None

    (w, _), _ = jax.lax.scan(step, (w, opt.init(w)), None, length=max_iter)
    return w


def fit_lbfgs(feats, labels, l2, *, max_iter: int = 300) -> dict:
    """Softmax regressions (mean cross-entropy + l2/2 |W|^2) fitted to convergence by
    full-batch L-BFGS, one per leading index of feats (models x l2 values share a vmap).

    feats: (M, N, F); l2: (M,). Returns {"weight": (M, 10, F), "bias": (M, 10)}.
    """
    y = jnp.asarray(labels, jnp.int32)
    return jax.vmap(_lbfgs, in_axes=(0, None, 0, None))(jnp.asarray(feats), y,
                                                        jnp.asarray(l2, jnp.float32), max_iter)


@jax.jit
def _n_wrong(w, f, y):
    return jnp.sum(jnp.argmax(f @ w["weight"].T + w["bias"], axis=-1) != y)


def feature_error(weights: dict, feats, labels) -> np.ndarray:
    """Per-model classification error (%) of fitted weights on features (M, N, F)."""
    y = jnp.asarray(labels, jnp.int32)
    wrong = jax.vmap(_n_wrong, in_axes=(0, 0, None))(weights, jnp.asarray(feats), y)
    return 100.0 * np.asarray(wrong) / len(labels)


def feature_scale(feats) -> jax.Array:
    """(M,) one factor per model that brings its features to unit root-mean-square (so that
    one L2 grid suits every model; sparsity is kept)."""
    rms = jnp.sqrt(jnp.mean(jnp.square(feats), axis=(1, 2)))
    return 1.0 / jnp.maximum(rms, 1e-12)


def select_l2(train_f, y_train, val_f, y_val, grid, *, max_iter: int = 300):
    """For every model, the L2 weight of `grid` with the lowest validation error.

    Returns (weights fitted with the chosen l2, chosen l2 (M,), validation errors (M, G)).
    """
    m, g = train_f.shape[0], len(grid)
    val_err = np.zeros((m, g))
    fits = []
    for j, l2 in enumerate(grid):  # one vmap over models per l2 (bounds memory)
        w = fit_lbfgs(train_f, y_train, np.full(m, l2), max_iter=max_iter)
        val_err[:, j] = feature_error(w, val_f, y_val)
        fits.append(w)
    best = val_err.argmin(axis=1)
    weights = jax.tree.map(lambda *ws: jnp.stack([ws[b][i] for i, b in enumerate(best)]), *fits)
    return weights, np.asarray(grid)[best], val_err


# ---------------------------------------------------------------- fine-tuning (Adam)

def _logits(params, x, n_active, *, cfg, max_k):
    f = features(x, params.get("enc"), n_active, cfg=cfg, max_k=max_k) * params.get("scale", 1.0)
    return f @ params["cls"]["weight"].T + params["cls"]["bias"]


def _xent(trainable, frozen, batch, n_active, *, cfg, max_k):
    logits = _logits({**frozen, **trainable}, batch["x"], n_active, cfg=cfg, max_k=max_k)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    return jnp.sum(ce * batch["w"]) / jnp.maximum(batch["w"].sum(), 1.0)


def _split(state: dict, finetune: bool):
    """(trainable, frozen): the classifier alone, or with the encoder when fine-tuning."""
    frozen = {k: v for k, v in state.items() if k == "scale" or (k != "cls" and not finetune)}
    return {k: v for k, v in state.items() if k not in frozen}, frozen


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
    """Trains the classifiers in `state` ({"cls", "enc", optional "scale"}, leading model
    axis) with Adam. Returns the new state; the arrays passed in are left intact."""
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


# ---------------------------------------------------------------- a small MLP classifier

def init_mlp(widths, key) -> list[dict]:
    """Layers of an MLP (He-uniform weights, zero biases); widths e.g. (784, 512, 512, 10)."""
    keys = jax.random.split(key, len(widths) - 1)
    return [{"weight": jax.random.uniform(k, (n_out, n_in), minval=-1, maxval=1) * jnp.sqrt(6 / n_in),
             "bias": jnp.zeros(n_out)} for k, n_in, n_out in zip(keys, widths[:-1], widths[1:])]


def mlp_hidden(layers, x):
    """Every hidden layer's ReLU activations, then the logits."""
    h, acts = x.reshape(x.shape[0], -1), []
    for layer in layers[:-1]:
        h = jax.nn.relu(h @ layer["weight"].T + layer["bias"])
        acts.append(h)
    return acts, h @ layers[-1]["weight"].T + layers[-1]["bias"]


@functools.partial(jax.jit, static_argnames=("batch_size", "lr"), donate_argnames=("layers", "opt_state"))
def _mlp_step(layers, opt_state, images, labels, order, i, *, batch_size, lr):
    batch = gather_batch(images, labels, order, i, batch_size)

    def loss(layers):
        logits = mlp_hidden(layers, batch["x"])[1]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.sum(ce * batch["w"]) / jnp.maximum(batch["w"].sum(), 1.0)

    tx = optax.adam(lr)
    updates, opt_state = tx.update(jax.grad(loss)(layers), opt_state, layers)
    return optax.apply_updates(layers, updates), opt_state


def train_mlp(images, labels, widths=(784, 512, 512, 10), *, epochs: int = 5, lr: float = 1e-3,
              batch_size: int = 128, seed: int = 0, progress: bool = True) -> list[dict]:
    """A ReLU MLP classifier on uint8 images, trained with Adam."""
    layers = init_mlp(widths, jax.random.key(seed))
    opt_state = optax.adam(lr).init(layers)
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    n = images.shape[0]
    n_batches = -(-n // batch_size)
    with tqdm(total=epochs * n_batches, disable=not progress, desc="MLP classifier", unit="step") as bar:
        for epoch in range(epochs):
            order = _padded(EpochOrder(n, seed, epoch).rows(0, n), batch_size)
            for i in range(n_batches):
                layers, opt_state = _mlp_step(layers, opt_state, images, labels, order, i,
                                              batch_size=batch_size, lr=lr)
                bar.update()
    return layers


@jax.jit
def _mlp_eval(layers, x):
    acts, logits = mlp_hidden(layers, x)
    return acts[-1], jnp.argmax(logits, axis=-1)


def mlp_activations(layers, images, batch_size: int = 5000):
    """(last hidden layer's activations (N, width) float32, predicted classes (N,))."""
    acts, preds = [], []
    for i in range(0, len(images), batch_size):
        a, p = _mlp_eval(layers, jnp.asarray(images[i:i + batch_size], jnp.float32) / 255)
        acts.append(np.asarray(a))
        preds.append(np.asarray(p))
    return np.concatenate(acts), np.concatenate(preds)
