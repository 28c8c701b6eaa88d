"""Runs sweeps on meshes of forced CPU devices and prints, as JSON, how far each lands from the
one-device run (the flag must be set before JAX starts, so tests run this in a subprocess).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharded_check.py OUT_DIR
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from ksae_jax import sae_config, sharding, train
from ksae_jax.checkpoint import Checkpoints
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data import synthetic
from ksae_jax.models.clt import CLTModel
from ksae_jax.topk import top_k


def rel_diff(a, b) -> float:
    """Largest |x - y| / |y| over all leaves (Frobenius norms of whole arrays)."""
    return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                     / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def max_elementwise(a, b) -> float:
    """Largest elementwise difference relative to the largest magnitude of its array."""
    return max(float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(cfg, train_x, test_x, axes=None, **kw):
    mesh = None if axes is None else sharding.make_mesh(axes)
    return train.train_sweep(cfg, train_x, test_x, progress=False, mesh=mesh, **kw)


def main(out: Path):
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 28, 28), dtype=np.uint8)
    image_cfg = SweepConfig(model=ImageModel("mlp", hidden=64), ks=(3, 12), steps=4,
                            batch_size=64)
    syn = synthetic.generate(3000, d=16, n_features=32, mean_active=3, seed=0)
    sae_cfg = sae_config(16, (2, 8), latents=64, steps=4, batch_size=128, dead_tokens=256,
                         multi_topk=True, eval_every=2)  # evaluated midway: resumable below
    # a cross-layer transcoder over 3 layers: rows of every layer's [input | output]
    clt_rows = np.concatenate([syn.x[:, :15], np.tanh(syn.x[:, :15] @ rng.normal(size=(15, 15)))],
                              axis=1).reshape(-1, 2, 3, 5).transpose(0, 2, 1, 3).reshape(-1, 30)
    clt_cfg = SweepConfig(model=CLTModel(d_in=5, n_layers=3, latents=48, dead_tokens=256),
                          ks=(2, 8), steps=4, batch_size=128)
    report, refs = {"devices": jax.device_count()}, {}
    for name, cfg, tr, te, meshes in [
            ("images", image_cfg, images[:320], images[320:],
             [{"model": 2, "data": 2}]),
            ("sae", sae_cfg, syn.x[:2600], syn.x[2600:],
             [{"model": 2, "data": 2}, {"latent": 2, "data": 2}]),
            ("clt", clt_cfg, clt_rows[:2600], clt_rows[2600:], [{"latent": 2, "data": 2}])]:
        ref = refs[name] = run(cfg, tr, te)
        for axes in meshes:
            got = run(cfg, tr, te, axes)
            report[f"{name} {sharding.format_axes(axes)}"] = {
                "params": rel_diff(got.params, ref.params),
                "params_max_elementwise": max_elementwise(got.params, ref.params),
                "since_fired_equal": bool(np.array_equal(got.since_fired, ref.since_fired)),
                "eval_fvu": rel_diff(got.history["eval_fvu"], ref.history["eval_fvu"])}

    # sharded top-k against lax.top_k, ties included
    x = jnp.round(jax.random.normal(jax.random.key(0), (6, 64)) * 2) / 2
    with sharding.use(sharding.make_mesh({"latent": 4})):
        got = jax.jit(lambda a: top_k(a, 7))(x)
    ref = jax.lax.top_k(x, 7)
    report["top_k_equal"] = bool(np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1]))

    # a checkpoint written on model=2 x data=2 (killed after its first evaluation point)
    # resumes on one device and on latent=2 x data=2, each ending where an uninterrupted run
    # ends
    cfg, full = sae_cfg, refs["sae"]
    real_save, ckpt = Checkpoints.save, out / "first" / "checkpoints"

    def save_then_stop(self, *args, **kw):
        real_save(self, *args, **kw)
        self.wait()
        raise KeyboardInterrupt

    Checkpoints.save = save_then_stop
    try:
        run(cfg, syn.x[:2600], syn.x[2600:], {"model": 2, "data": 2}, checkpoint=ckpt)
    except KeyboardInterrupt:
        pass
    Checkpoints.save = real_save
    for i, axes in enumerate((None, {"latent": 2, "data": 2})):
        copy = out / f"copy{i}" / "checkpoints"
        shutil.copytree(ckpt, copy)
        resumed = run(cfg, syn.x[:2600], syn.x[2600:], axes, checkpoint=copy, resume=True)
        where = sharding.format_axes(axes) if axes else "one device"
        report[f"resume from model=2,data=2 on {where}"] = rel_diff(resumed.params, full.params)
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
