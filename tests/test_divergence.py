"""Divergence: a model whose loss, parameters or outputs become non-finite is frozen or stops
the run, as asked; never a NaN written as a result."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import batching, cli, image_run, train
from ksae_jax.config import ImageModel, SweepConfig

MLP = ImageModel("mlp", hidden=64)  # divergence does not depend on the architecture

RUN = ["--arch", "mlp", "--hidden", "64", "--dataset", "mnist-sample", "--train-limit", "1200",
       "--ks", "5", "20"]


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)


def _blow_up_model_1(monkeypatch):
    init = train.init_state

    def init_with_a_huge_model(cfg, rows=None, params=None, mesh=None):
        state = init(cfg, rows, params, mesh)
        state.params["enc"]["weight"] = state.params["enc"]["weight"].at[1].multiply(1e30)
        return state

    monkeypatch.setattr(train, "init_state", init_with_a_huge_model)


def test_diverging_model_is_frozen_and_the_others_train_on(images, monkeypatch):
    _blow_up_model_1(monkeypatch)
    cfg = SweepConfig(model=MLP, ks=(5, 20), epochs=2, batch_size=100)
    r = train.train_sweep(cfg, images, images[:50], progress=False, on_nan="continue")
    assert r.diverged == {20: {"epoch": 1, "step": 1}}
    assert r.history["step"] == [2, 4]
    assert r.history["train_loss"][1] == [None, None] and None not in r.history["train_loss"][0]
    for leaf in jax.tree.leaves(r.params):
        assert np.isfinite(leaf).all()  # never NaN params
    huge = train.init_state(cfg).params  # the patched init: model 1 stays exactly there
    np.testing.assert_array_equal(r.params["enc"]["weight"][1], huge["enc"]["weight"][1])
    assert not np.array_equal(r.params["enc"]["weight"][0], huge["enc"]["weight"][0])


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(images, monkeypatch, tmp_path):
    cfg = SweepConfig(model=MLP, ks=(5, 20), epochs=3, batch_size=100)
    ckpt = tmp_path / "checkpoints"
    real_step = train.sweep_step

    def poison_epoch_2(state, sums, batch, ks, step, **kw):
        if int(step) == 2:  # first step of epoch 2: model 0 turns non-finite
            models = batching.split(batching.stacked(state.params), 2)
            poisoned = (jax.tree.map(lambda a: a * jnp.nan, models[0]), models[1])
            params = batching.Models(poisoned)
            if not isinstance(state.params, batching.Models):
                params = batching.stacked(params)
            state = state._replace(params=params)
        return real_step(state, sums, batch, ks, step, **kw)

    monkeypatch.setattr(train, "sweep_step", poison_epoch_2)
    with pytest.raises(train.Diverged, match=r"k=5 at step 3 \(epoch 2\); the previous checkpoint is kept"):
        train.train_sweep(cfg, images, None, progress=False, checkpoint=ckpt)
    from ksae_jax.checkpoint import Checkpoints
    ckpts = Checkpoints(ckpt)
    state, meta = ckpts.restore(train.prepare(cfg, images).abstract_state())
    assert ckpts.latest() == 2 == meta["step"]
    for leaf in jax.tree.leaves(state):
        assert np.isfinite(leaf).all()


def test_cli_reports_divergence_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: image_run.main(RUN + ["--epochs", "2", "--batch-size", "100", "--lr", "1e30",
                                              "--no-progress", "--out", str(out)]), "ksweep")
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ksweep: error: non-finite loss or outputs: k=5 at step ") and "\n" not in err
    assert not (out / "params.pkl").exists()


def test_a_run_that_diverges_on_its_only_step_fails(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: image_run.main(
            ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp", "--hidden", "16",
             "--ks", "3", "--steps", "1", "--batch-size", "100", "--lr", "1e38", "--no-progress",
             "--out", str(out)]), "ksweep")
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "non-finite" in err
    assert not out.exists()  # the run made the folder and wrote nothing into it: removed
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: image_run.main(
            ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp", "--hidden", "16",
             "--ks", "3", "--steps", "1", "--batch-size", "100", "--lr", "1e38", "--on-nan",
             "continue", "--no-progress", "--out", str(out), "--overwrite"]), "ksweep")
    assert e.value.code == 1 and not (out / "params.pkl").exists()
    text = (out / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert "NaN" not in text and "Infinity" not in text
