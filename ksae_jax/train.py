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


def train_step(params, opt_state, batch: dict, k, l1, active=True, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, max_k: int, batching: str = "vmap"):
    """One Adam step of one model. batch: {"x": (B, 28, 28) float, "w": (B,) weights}.

    The parameters are left unchanged when `active` is False or the loss or a gradient is
    not finite (metrics["finite"] says which); the optimizer state of such a step is not
    meant to be used again. batching: how a vmapped sweep batches the gradient: "vmap"
    (vmap's rules) or "loop" (one model after another, see loop_over_models); the result
    is the same.
    """
    grad_fn = jax.value_and_grad(functools.partial(ksae_loss, cfg=cfg, max_k=max_k), has_aux=True)
    if batching == "loop":
        grad_fn = loop_over_models(grad_fn)
    (_, metrics), grads = grad_fn(params, batch["x"], batch["w"], k, l1)
    finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    # masking only the parameter update keeps every buffer updated in place; selecting
    # between old and new optimizer states as well doubled the MLP step time (fresh buffers)
    keep = finite & active
    params = jax.tree.map(lambda p, u: p + jnp.where(keep, u, 0), params, updates)
    return params, opt_state, {**metrics, "finite": finite}


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


# ---------------------------------------------------------------- models of a sweep

def default_batching(cfg: ModelConfig) -> str:
    """"loop" for the conv network (see loop_over_models), "vmap" for the MLP's matmuls."""
    return "loop" if cfg.arch == "conv" else "vmap"


def batching_of(cfg: SweepConfig) -> str:
    """The sweep's batching, with "auto" resolved for its architecture."""
    return default_batching(cfg.model) if cfg.batching == "auto" else cfg.batching


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


def _pad_to_batches(idx: jax.Array, batch_size: int) -> jax.Array:
    """idx padded with -1 (no example) up to a whole number of batches."""
    pad = -len(idx) % batch_size
    return jnp.concatenate([idx.astype(jnp.int32), jnp.full(pad, -1, jnp.int32)])


def epoch_order(key: jax.Array, n: int, batch_size: int) -> jax.Array:
    """A random permutation of range(n), padded with -1 up to whole batches."""
    return _pad_to_batches(jax.random.permutation(key, n), batch_size)


def sequential_order(n: int, batch_size: int) -> jax.Array:
    return _pad_to_batches(jnp.arange(n), batch_size)


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
                   donate_argnames=("params", "opt_state", "sums", "diverged_at"))
def sweep_step(params, opt_state, sums, diverged_at, images, order, i, step_index, ks, l1s, *,
               cfg: ModelConfig, lr: float, batch_size: int, max_k: int, batching: str = "vmap"):
    """One step of every model of a sweep, on batch i of `order`.

    A model whose loss or gradients are not finite keeps its last finite parameters from
    then on; diverged_at records the global step at which that happened (-1: never).
    sums accumulates per-model (loss, mse) x batch size over the healthy models.
    """
    batch = gather_batch(images, order, i, batch_size)
    step = functools.partial(train_step, cfg=cfg, tx=make_optimizer(lr), max_k=max_k,
                             batching=batching)
    alive = diverged_at < 0
    params, opt_state, metrics = jax.vmap(step, in_axes=(0, 0, None, 0, 0, 0))(
        params, opt_state, batch, ks, l1s, alive)
    diverged_at = jnp.where(alive & ~metrics["finite"], step_index, diverged_at)
    new = batch["w"].sum() * jnp.stack([metrics["loss"], metrics["mse"]], axis=-1)
    sums = sums + jnp.where((alive & metrics["finite"])[:, None], new, 0.0)
    return params, opt_state, sums, diverged_at


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
    history: dict         # per-model, per-epoch metrics (lists; None after a divergence)
    seconds: float        # wall time of the epoch loop (compilation included; all sessions)
    compile_seconds: float
    diverged: dict        # k -> {"epoch": e, "step": s} (1-based) of models that diverged


class Diverged(RuntimeError):
    """A model's loss or parameters became non-finite and on_nan="stop"."""


class CheckpointMismatch(ValueError):
    """A checkpoint was made with another configuration than the one resuming it."""


def check_images(images, name: str) -> np.ndarray:
    """uint8 (N, 28, 28), as the training and evaluation loops take them."""
    a = np.asarray(images)
    if a.ndim != 3 or a.shape[1:] != model.IMAGE_SHAPE or a.dtype != np.uint8 or len(a) == 0:
        raise ValueError(f"{name} must be a non-empty uint8 array of shape (N, 28, 28), got "
                         f"{a.dtype} {a.shape}")
    return a


def _where_diverged(cfg: SweepConfig, diverged_at: np.ndarray, n_batches: int) -> dict:
    return {k: {"epoch": int(g) // n_batches + 1, "step": int(g) % n_batches + 1}
            for k, g in zip(cfg.ks, diverged_at) if g >= 0}


def _restore(cfg: SweepConfig, path, run_info: dict) -> dict:
    from ksae_jax.checkpoint import config_diff, load_checkpoint

    ckpt = load_checkpoint(path)
    diff = config_diff(ckpt["config"], {**cfg.to_dict(), **run_info})
    if diff:
        raise CheckpointMismatch(f"{path}: made with a different config: " + "; ".join(diff))
    params_like, opt_like = jax.eval_shape(lambda: init_models(cfg))
    want = jax.tree.map(lambda s: s.shape, params_like)
    opt_leaves, treedef = jax.tree.flatten(opt_like)
    if (jax.tree.map(np.shape, ckpt["params"]) != want
            or [np.shape(a) for a in ckpt["opt_state"]] != [s.shape for s in opt_leaves]):
        raise CheckpointMismatch(f"{path}: its arrays do not match the configured models")
    ckpt["opt_state"] = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in ckpt["opt_state"]])
    ckpt["params"] = jax.tree.map(jnp.asarray, ckpt["params"])
    return ckpt


def train_sweep(cfg: SweepConfig, train_images: np.ndarray, test_images: np.ndarray | None = None,
                *, progress: bool = True, checkpoint=None, resume: bool = False,
                on_nan: str = "stop", run_info: dict | None = None) -> SweepResult:
    """Trains every k of `cfg` side by side in one compiled program.

    train_images/test_images: uint8 arrays (N, 28, 28).
    checkpoint: a file written (atomically) after every epoch; with resume=True training
      continues from it and ends with the same parameters as an uninterrupted run.
    on_nan: "stop" raises Diverged at the end of the epoch in which a model's loss became
      non-finite (the checkpoint of the previous epoch is kept); "continue" freezes that
      model at its last finite state and trains the others on.
    run_info: extra settings (e.g. the data used) stored in the checkpoint and required
      to match on resume.
    """
    from ksae_jax.checkpoint import save_checkpoint

    if on_nan not in ("stop", "continue"):
        raise ValueError(f"on_nan must be 'stop' or 'continue', got {on_nan!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    train_images = check_images(train_images, "train_images")
    if test_images is not None:  # on the device once, not at every epoch's evaluation
        test_images = jax.device_put(check_images(test_images, "test_images"))
    run_info = run_info or {}
    t0 = time.perf_counter()
    images = jax.device_put(train_images)
    n = images.shape[0]
    n_batches = -(-n // cfg.batch_size)
    n_models = len(cfg.ks)
    l1s = jnp.full(n_models, cfg.l1, jnp.float32)
    data_key = jax.random.key(cfg.seed)
    if resume:
        ckpt = _restore(cfg, checkpoint, run_info)
        params, opt_state, history = ckpt["params"], ckpt["opt_state"], ckpt["history"]
        first_epoch, seconds_before = ckpt["epoch"], ckpt["seconds"]
        diverged_at = jnp.asarray(ckpt["diverged_at"], jnp.int32)
    else:
        params, opt_state = init_models(cfg)
        history = {"train_loss": [], "train_mse": [], "test_mse": []}
        first_epoch, seconds_before = 0, 0.0
        diverged_at = jnp.full(n_models, -1, jnp.int32)
    batching = batching_of(cfg)
    step = functools.partial(sweep_step, cfg=cfg.model, lr=cfg.lr, batch_size=cfg.batch_size,
                             max_k=cfg.max_k, batching=batching)
    compile_seconds = 0.0
    bar = tqdm(total=cfg.epochs * n_batches, initial=first_epoch * n_batches,
               disable=not progress, unit="step", desc=f"{n_models} models")
    for epoch in range(first_epoch, cfg.epochs):
        order = epoch_order(jax.random.fold_in(data_key, epoch), n, cfg.batch_size)
        sums = jnp.zeros((n_models, 2), jnp.float32)
        dead_before = np.asarray(diverged_at)
        for i in range(n_batches):
            ks_now = jnp.asarray(k_at(cfg, epoch + i / n_batches), jnp.int32)
            tc = time.perf_counter()
            params, opt_state, sums, diverged_at = step(
                params, opt_state, sums, diverged_at, images, order, i, epoch * n_batches + i,
                ks_now, l1s)
            if epoch == first_epoch and i == 0:
                jax.block_until_ready(sums)
                compile_seconds = time.perf_counter() - tc
            bar.update()
        dead = np.asarray(diverged_at)
        newly = (dead >= 0) & (dead_before < 0)
        if on_nan == "stop" and newly.any():
            bar.close()
            where = _where_diverged(cfg, np.where(newly, dead, -1), n_batches)
            lines = ", ".join(f"k={k} at epoch {w['epoch']} step {w['step']}" for k, w in where.items())
            kept = f"; the checkpoint of epoch {epoch} is kept" if checkpoint and epoch else ""
            raise Diverged(f"non-finite loss: {lines}{kept}")
        alive = dead < 0

        def record(name, values):  # None for the models that diverged
            history[name].append([float(v) if a else None for v, a in zip(values, alive)])

        epoch_sums = np.asarray(sums) / n
        record("train_loss", epoch_sums[:, 0])
        record("train_mse", epoch_sums[:, 1])
        if test_images is not None:
            record("test_mse", evaluate(cfg.model, params, test_images, cfg.ks, max_k=cfg.max_k,
                                        batching=batching))
        healthy = epoch_sums[alive, 0]
        bar.set_postfix(loss=f"{healthy.mean():.4f}" if healthy.size else "diverged")
        if checkpoint is not None:
            save_checkpoint(checkpoint, config={**cfg.to_dict(), **run_info}, epoch=epoch + 1,
                            params=params, opt_state=opt_state, history=history,
                            diverged_at=diverged_at,
                            seconds=seconds_before + time.perf_counter() - t0)
    bar.close()
    per_model = {k: [list(e) for e in zip(*v)] for k, v in history.items() if v}
    return SweepResult(jax.tree.map(np.asarray, params), per_model,
                       seconds_before + time.perf_counter() - t0, compile_seconds,
                       _where_diverged(cfg, np.asarray(diverged_at), n_batches))
