"""The model families: one forward per family, called by training, evaluation and inference
alike; and no code outside the families (and the configs) asks which kind a model is."""
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from ksae_jax import models, sae_config, train
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.data import synthetic
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate

ROOT = Path(__file__).resolve().parents[1]


def _cases():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    vectors = synthetic.generate(600, d=16, n_features=24, mean_active=3, seed=0).x
    # one case per family: conv and mlp are both ImageFamily (the mlp compiles faster)
    yield "mlp", SweepConfig(model=ImageModel("mlp", hidden=32), ks=(3,), steps=2,
                             batch_size=30), images, ArrayRows(images, 1 / 255)
    sae = sae_config(16, (3,), latents=48, steps=2, batch_size=100, multi_topk=True)
    yield "topk", sae, vectors, models.family(sae.model).rows(vectors, "x")


@pytest.mark.parametrize("name,cfg,x,rows", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_training_evaluation_and_inference_call_the_one_forward(name, cfg, x, rows, monkeypatch):
    family = models.family(cfg.model)

    def outcomes():
        r = train.train_sweep(cfg, x, progress=False)
        ev = evaluate(cfg, jax.tree.map(np.asarray, r.params), EvalSet(rows))
        recon = r.models().reconstruct(x[:5], cfg.ks[0])
        return r.params, ev.mse, recon

    before = outcomes()
    real = type(family).forward

    def changed(self, params, x, *args, **kw):  # the family's forward, on shifted inputs
        return real(self, params, x + 0.25, *args, **kw)

    monkeypatch.setattr(type(family), "forward", changed)
    jax.clear_caches()  # the jitted steps traced the old forward
    try:
        after = outcomes()
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    trained_differently = any(not np.array_equal(a, b) for a, b in
                              zip(jax.tree.leaves(before[0]), jax.tree.leaves(after[0])))
    assert trained_differently, f"{name}: training did not call the family's forward"
    assert not np.allclose(before[1], after[1]), f"{name}: evaluation did not call it"
    assert not np.allclose(before[2], after[2]), f"{name}: inference did not call it"


def test_no_code_outside_the_families_asks_which_kind_a_model_is():
    pattern = re.compile(r"is_image|arch ==|arch in |arch != ")
    hits = []
    for folder in ("ksae_jax", "experiments"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("ksae_jax/models/") or rel == "ksae_jax/config.py":
                continue
            hits += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if pattern.search(line)]
    assert hits == []
