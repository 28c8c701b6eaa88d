"""Pure optax train step, vmapped over the models of a k sweep, and the epoch loop around it."""
from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from ksae_jax import model
from ksae_jax.config import ModelConfig, SweepConfig
from ksae_jax.losses import ksae_loss


def make_optimizer(lr: float) -> optax.GradientTransformation:
    """Adam with PyTorch's defaults, as the original."""
    return optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)


def loop_over_models(f: Callable) -> Callable:
    """f, batched under vmap by running it once per model (an unrolled loop) instead of by
    vmap's batching rules.

    vmap turns a convolution with per-model weights into a grouped convolution, which
    XLA:CPU runs several times slower than the models' convolutions one after another.
    Without vmap this is f itself.
    """
    g = jax.custom_batching.custom_vmap(f)

    @g.def_vmap
    def _rule(axis_size, in_batched, *args):
        outs = [f(*jax.tree.map(lambda a, b: a[m] if b else a, list(args), list(in_batched)))
                for m in range(axis_size)]
        out = jax.tree.map(lambda *o: jnp.stack(o), *outs)
        return out, jax.tree.map(lambda _: True, out)

    return g


def train_step(params, opt_state, batch: dict, k, l1, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, max_k: int, batching: str = "vmap"):
    """One Adam step of one model. batch: {"x": (B, 28, 28) float, "w": (B,) weights}.

    batching: how a vmapped sweep batches the gradient: "vmap" (vmap's rules) or "loop"
    (one model after another, see loop_over_models); the result is the same.
    """
    grad_fn = jax.value_and_grad(functools.partial(ksae_loss, cfg=cfg, max_k=max_k), has_aux=True)
    if batching == "loop":
        grad_fn = loop_over_models(grad_fn)
    (_, metrics), grads = grad_fn(params, batch["x"], batch["w"], k, l1)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


# ---------------------------------------------------------------- models of a sweep

def default_batching(cfg: ModelConfig) -> str:
    """"loop" for the conv network (see loop_over_models), "vmap" for the MLP's matmuls."""
    return "loop" if cfg.arch == "conv" else "vmap"


def init_models(cfg: SweepConfig, seeds=None):
    """Stacked (leading model axis) params and Adam states, one model per k.

    seeds: per-model init seeds; by default every model starts from cfg.seed, as each of
    the original's one-k runs did (torch.manual_seed(1)).
    """
    seeds = np.full(len(cfg.ks), cfg.seed) if seeds is None else np.asarray(seeds)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    params = jax.vmap(functools.partial(model.init_params, cfg.model))(keys)
    opt_state = jax.vmap(make_optimizer(cfg.lr).init)(params)
    return params, opt_state


def epoch_order(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    """A random permutation of range(n), padded with -1 up to whole batches."""
    n_batches = -(-n // batch_size)
    perm = jax.random.permutation(key, n).astype(jnp.int32)
    return jnp.concatenate([perm, jnp.full(n_batches * batch_size - n, -1, jnp.int32)])


def sequential_order(n: int, batch_size: int) -> jax.Array:
    n_batches = -(-n // batch_size)
    idx = np.arange(n_batches * batch_size, dtype=np.int32)
    return jnp.asarray(np.where(idx < n, idx, -1))


def gather_batch(images: jax.Array, order: jax.Array, i, batch_size: int,
                 labels: jax.Array | None = None) -> dict:
    """Batch i of `order` from device-resident uint8 images, scaled to [0, 1].

    "w" is 1 for real examples and 0 for the padding of a last, partial batch.
    """
    idx = jax.lax.dynamic_slice(order, (i * batch_size,), (batch_size,))
    safe = jnp.maximum(idx, 0)
    batch = {"x": images[safe].astype(jnp.float32) / 255.0, "w": (idx >= 0).astype(jnp.float32)}
    if labels is not None:
        batch["y"] = labels[safe]
    return batch


@functools.partial(jax.jit, static_argnames=("cfg", "lr", "batch_size", "max_k", "batching"),
                   donate_argnames=("params", "opt_state", "sums"))
def sweep_step(params, opt_state, sums, images, order, i, ks, l1s, *, cfg: ModelConfig,
               lr: float, batch_size: int, max_k: int, batching: str = "vmap"):
    """One step of every model; sums accumulates per-model (loss, mse) x batch size."""
    batch = gather_batch(images, order, i, batch_size)
    step = functools.partial(train_step, cfg=cfg, tx=make_optimizer(lr), max_k=max_k,
                             batching=batching)
    params, opt_state, metrics = jax.vmap(step, in_axes=(0, 0, None, 0, 0))(
        params, opt_state, batch, ks, l1s)
    n = batch["w"].sum()
    sums = sums + n * jnp.stack([metrics["loss"], metrics["mse"]], axis=-1)
    return params, opt_state, sums


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "max_k", "batching"))
def _eval_sums(params, images, order, i, ks, *, cfg: ModelConfig, batch_size: int, max_k: int,
               batching: str):
    batch = gather_batch(images, order, i, batch_size)

    def sse(p, k):
        out = model.apply(cfg, p, batch["x"], k, max_k)
        return jnp.sum(jnp.square(out.recon - batch["x"]) * batch["w"][:, None, None])

    return jax.vmap(loop_over_models(sse) if batching == "loop" else sse)(params, ks)


def evaluate(cfg: ModelConfig, params, images, ks, *, batch_size: int = 1000, max_k=None,
             batching: str | None = None):
    """True mean squared error per model over all of `images` (uint8, N x 28 x 28)."""
    batching = batching or default_batching(cfg)
    images = jnp.asarray(images)
    ks = jnp.asarray(ks, jnp.int32)
    max_k = int(np.max(ks)) if max_k is None else max_k
    n = images.shape[0]
    order = sequential_order(n, batch_size)
    total = jnp.zeros(ks.shape, jnp.float32)
    for i in range(order.shape[0] // batch_size):
        total = total + _eval_sums(params, images, order, i, ks, cfg=cfg, batch_size=batch_size,
                                   max_k=max_k, batching=batching)
    return np.asarray(total) / (n * images.shape[1] * images.shape[2])


# ---------------------------------------------------------------- the epoch loop

def k_at(cfg: SweepConfig, epoch_float: float) -> np.ndarray:
    """Per-model k at a point of training: the schedule's k, or the target k."""
    ks = np.asarray(cfg.ks)
    if cfg.k_start is None or epoch_float >= cfg.k_anneal_epochs:
        return ks
    frac = epoch_float / cfg.k_anneal_epochs
    return np.maximum(ks, np.round(cfg.k_start + frac * (ks - cfg.k_start))).astype(np.int32)


class SweepResult(NamedTuple):
    params: dict          # stacked numpy params, leading axis = model (one per k)
    history: dict         # per-model, per-epoch metrics (lists)
    seconds: float        # wall time of the epoch loop (compilation included)
    compile_seconds: float


def train_sweep(cfg: SweepConfig, train_images: np.ndarray, test_images: np.ndarray | None = None,
                *, progress: bool = True, on_epoch: Callable | None = None) -> SweepResult:
    """Trains every k of `cfg` side by side in one compiled program.

    train_images/test_images: uint8 arrays (N, 28, 28). on_epoch(epoch, params, opt_state,
    history) is called after each epoch (e.g. to checkpoint).
    """
    t0 = time.perf_counter()
    images = jax.device_put(jnp.asarray(train_images))
    n = images.shape[0]
    n_batches = -(-n // cfg.batch_size)
    l1s = jnp.full(len(cfg.ks), cfg.l1, jnp.float32)
    data_key = jax.random.key(cfg.seed)
    params, opt_state = init_models(cfg)
    batching = cfg.batching if cfg.batching != "auto" else default_batching(cfg.model)
    step = functools.partial(sweep_step, cfg=cfg.model, lr=cfg.lr, batch_size=cfg.batch_size,
                             max_k=cfg.max_k, batching=batching)
    history = {"train_loss": [], "train_mse": [], "test_mse": []}
    compile_seconds = 0.0
    bar = tqdm(total=cfg.epochs * n_batches, disable=not progress, unit="step",
               desc=f"{len(cfg.ks)} models")
    for epoch in range(cfg.epochs):
        order = epoch_order(jax.random.fold_in(data_key, epoch), n, cfg.batch_size)
        sums = jnp.zeros((len(cfg.ks), 2), jnp.float32)
        for i in range(n_batches):
            ks_now = jnp.asarray(k_at(cfg, epoch + i / n_batches), jnp.int32)
            tc = time.perf_counter()
            params, opt_state, sums = step(params, opt_state, sums, images, order, i, ks_now, l1s)
            if epoch == 0 and i == 0:
                jax.block_until_ready(sums)
                compile_seconds = time.perf_counter() - tc
            bar.update()
        epoch_sums = np.asarray(sums) / n
        history["train_loss"].append(epoch_sums[:, 0].tolist())
        history["train_mse"].append(epoch_sums[:, 1].tolist())
        if test_images is not None:
            history["test_mse"].append(
                evaluate(cfg.model, params, test_images, cfg.ks, max_k=cfg.max_k,
                         batching=batching).tolist())
        bar.set_postfix(loss=f"{epoch_sums[:, 0].mean():.4f}")
        if on_epoch is not None:
            on_epoch(epoch, params, opt_state, history)
    bar.close()
    history = {k: np.asarray(v).T.tolist() for k, v in history.items() if v}  # per model
    params = jax.tree.map(np.asarray, params)
    return SweepResult(params, history, time.perf_counter() - t0, compile_seconds)
