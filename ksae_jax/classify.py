"""Makhzani & Frey's evaluation: softmax classifiers on raw pixels or on k-sparse codes
(alpha * k units kept), vmapped over models, trained with Adam (on frozen codes, or with the
encoder when fine-tuning), the epoch chosen on a validation split; and a small MLP classifier
whose hidden activations serve as real vectors for the SAEs."""
from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ksae_jax import models
from ksae_jax.config import ImageModel
from ksae_jax.data.feed import EpochOrder, gather

N_CLASSES = 10


def init_linear(n_in: int, n_models: int, n_classes: int = N_CLASSES) -> dict:
    """Zero-initialised softmax regressions, one per model (leading axis)."""
    return {"weight": jnp.zeros((n_models, n_classes, n_in)), "bias": jnp.zeros((n_models, n_classes))}


def features(x, enc_params, n_active, *, cfg: ImageModel | None, max_k: int):
    """Classifier inputs: raw pixels (cfg None), or the code with n_active units kept."""
    if cfg is None:
        return x.reshape(x.shape[0], -1)
    family = models.family(cfg)
    return family.forward(enc_params, x, jnp.ones(x.shape[0]), {"k": n_active}, max_k,
                          terms=False).code


def _padded(order: np.ndarray, batch_size: int) -> jax.Array:
    return jnp.asarray(np.concatenate([order, np.full(-len(order) % batch_size, -1)]), jnp.int32)


def gather_batch(images, labels, order, i, batch_size: int) -> dict:
    """Batch i of `order` (padded with -1): pixels in [0, 1], labels, weights."""
    batch = gather(images, order, i, 1 / 255, batch_size=batch_size)
    idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
    return {**batch, "y": labels[jnp.maximum(idx, 0)]}


# ---------------------------------------------------------------- training (Adam)

def _logits(params, x, n_active, *, cfg, max_k):
    f = features(x, params.get("enc"), n_active, cfg=cfg, max_k=max_k)
    return f @ params["cls"]["weight"].T + params["cls"]["bias"]


def _xent(trainable, frozen, batch, n_active, l2, *, cfg, max_k):
    """Mean cross-entropy, plus 0.5 * l2 * |W|^2 of the softmax weights (not the biases)."""
    params = {**frozen, **trainable}
    logits = _logits(params, batch["x"], n_active, cfg=cfg, max_k=max_k)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
    penalty = 0.5 * l2 * jnp.sum(jnp.square(params["cls"]["weight"]))
    return jnp.sum(ce * batch["w"]) / jnp.maximum(batch["w"].sum(), 1.0) + penalty


def _split(state: dict, finetune: bool):
    """(trainable, frozen): the classifier alone, or with the encoder when fine-tuning."""
    if finetune:
        return state, {}
    return {"cls": state["cls"]}, {k: v for k, v in state.items() if k != "cls"}


@functools.partial(jax.jit, static_argnames=("cfg", "max_k", "lr", "batch_size", "finetune"),
                   donate_argnames=("state", "opt_state"))
def classifier_step(state, opt_state, images, labels, order, i, n_active, l2, *, cfg,
                    max_k: int, lr: float, batch_size: int, finetune: bool):
    """One Adam step of every model's classifier (and encoder when finetune); n_active and the
    L2 penalty l2 are per model."""
    batch = gather_batch(images, labels, order, i, batch_size)
    tx = optax.adam(lr)

    def one(state, opt_state, n_active, l2):
        trainable, frozen = _split(state, finetune)
        grads = jax.grad(_xent)(trainable, frozen, batch, n_active, l2, cfg=cfg, max_k=max_k)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return {**state, **optax.apply_updates(trainable, updates)}, opt_state

    return jax.vmap(one)(state, opt_state, n_active, l2)


def _epochs(state: dict, images, labels, n_active, *, cfg, max_k: int, epochs: int, lr: float,
            batch_size: int = 600, seed: int = 0, finetune: bool = False, progress: bool = True,
            desc: str = "classifier", l2=None):
    """Adam over the classifiers in `state`: yields (epoch, state) after every epoch. l2: each
    model's L2 penalty on its softmax weights (None: none)."""
    state = jax.tree.map(jnp.array, state)  # the caller's arrays stay intact (steps donate)
    images, labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    n_active = jnp.asarray(n_active, jnp.int32)
    l2 = jnp.zeros(n_active.shape, jnp.float32) if l2 is None else jnp.asarray(l2, jnp.float32)
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
                state, opt_state = step(state, opt_state, images, labels, order, i, n_active, l2)
                bar.update()
            yield epoch + 1, state


def fit(state: dict, images, labels, n_active, *, cfg: ImageModel | None, max_k: int,
        epochs: int, lr: float, batch_size: int = 600, seed: int = 0, finetune: bool = False,
        progress: bool = True, desc: str = "classifier") -> dict:
    """Trains the classifiers in `state` ({"cls": ..., "enc": ...}, leading model axis) with
    Adam for `epochs`; returns the new state (the arrays passed in are left intact)."""
    for _, state in _epochs(state, images, labels, n_active, cfg=cfg, max_k=max_k, epochs=epochs,
                            lr=lr, batch_size=batch_size, seed=seed, finetune=finetune,
                            progress=progress, desc=desc):
        pass
    return state


def fit_on_validation(state: dict, images, labels, n_active, val, *, cfg: ImageModel | None,
                      max_k: int, **kw) -> tuple[dict, dict]:
    """fit, keeping for each model the state of the epoch with the lowest error on `val`
    ((images, labels) of a validation split, never the test set). Returns (state, choice):
    choice["epoch"] and choice["val_error_pct"] per model."""
    best = best_err = best_epoch = None
    for epoch, state in _epochs(state, images, labels, n_active, cfg=cfg, max_k=max_k, **kw):
        err = error_rate(state, *val, n_active, cfg=cfg, max_k=max_k)
        if best is None:  # a copy: the next step donates (deletes) this epoch's buffers
            best, best_err, best_epoch = jax.tree.map(jnp.copy, state), err, np.full(len(err), epoch)
            continue
        better = err < best_err
        best = jax.tree.map(lambda new, old: jnp.where(_along(better, new), new, old), state, best)
        best_err, best_epoch = np.where(better, err, best_err), np.where(better, epoch, best_epoch)
    return best, {"epoch": best_epoch.tolist(), "val_error_pct": best_err.tolist()}


def _along(mask: np.ndarray, like: jax.Array) -> jax.Array:
    """A per-model mask broadcastable against an array with a leading model axis."""
    return jnp.asarray(mask).reshape(-1, *([1] * (like.ndim - 1)))


@functools.partial(jax.jit, static_argnames=("cfg", "max_k", "batch_size"))
def _n_errors(state, images, labels, order, i, n_active, *, cfg, max_k, batch_size):
    batch = gather_batch(images, labels, order, i, batch_size)

    def one(params, n_active):
        pred = jnp.argmax(_logits(params, batch["x"], n_active, cfg=cfg, max_k=max_k), axis=-1)
        return jnp.sum((pred != batch["y"]) * batch["w"])

    return jax.vmap(one)(state, n_active)


def error_rate(state: dict, images, labels, n_active, *, cfg: ImageModel | None, max_k: int,
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


@dataclasses.dataclass(frozen=True)
class ActivationsConfig:
    """The classifier whose last hidden layer gives the vectors: a ReLU MLP 784-W-W-10."""

    width: int = 512
    """Hidden layer width W."""
    epochs: int = 5
    """Adam epochs."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 1e-3
    """Adam's learning rate."""
    seed: int = 0
    """Init and data order."""

    def __post_init__(self):
        for name in ("width", "epochs", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")


def write_activations(cfg: ActivationsConfig, ds, out: Path, source: str, progress: bool) -> dict:
    """Trains the classifier on ds and writes out/{train,test}.npy (its last hidden layer's
    activations of every image, in order), their labels and info.json."""
    from ksae_jax.files import atomic_write, write_json

    widths = (784, cfg.width, cfg.width, 10)
    print(f"dataset {ds.name}: {len(ds.x_train)} train / {len(ds.x_test)} test images; "
          f"MLP {'-'.join(map(str, widths))}, {cfg.epochs} epochs")
    layers = train_mlp(ds.x_train, ds.y_train, widths, epochs=cfg.epochs, lr=cfg.lr,
                       batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    info = {"dataset": ds.name, "source": source, "widths": list(widths), "epochs": cfg.epochs,
            "layer": "last hidden (ReLU)",
            "rows": "train.npy: the training images in order; test.npy: the test images"}
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        acts, pred = mlp_activations(layers, x)
        for name, array in ((split, acts.astype(np.float32)), (f"{split}_labels", y.astype(np.int64))):
            buf = io.BytesIO()
            np.save(buf, array)
            atomic_write(out / f"{name}.npy", lambda f, b=buf: f.write(b.getvalue()))
        info[f"{split}_error_pct"] = float(100 * np.mean(pred != y))
        info[f"{split}_shape"] = list(acts.shape)
        info[f"{split}_active_frac"] = float(np.mean(acts > 0))
    write_json(out / "info.json", info)
    print(f"classifier error: {info['train_error_pct']:.2f}% train, {info['test_error_pct']:.2f}% test; "
          f"{100 * info['train_active_frac']:.1f}% of activations non-zero")
    print(f"wrote {out / 'train.npy'} {tuple(info['train_shape'])} and {out / 'test.npy'} "
          f"{tuple(info['test_shape'])}")
    return info
