"""The main job (the image k sweep, python -m experiments.ksweep) end to end on tiny configs."""
import json

import numpy as np
import pytest
from helpers import latest_checkpoint

import ksae_jax
from ksae_jax import image_run, train
from ksae_jax.data import images as data
TINY = ["--ks", "5", "12", "--epochs", "2", "--batch-size", "100", "--train-limit", "300",
        "--no-progress"]


def expected_files(ks):
    files = {"params.pkl", "metrics.json", "checkpoints", "loss_curves.png", "compare_ks.png"}
    for k in ks:
        files |= {f"recon_k{k}_train.png", f"recon_k{k}_test.png", f"features_k{k}.png"}
    return files


def test_tiny_run_writes_every_output(tmp_path, monkeypatch, capsys):
    def offline(name, data_dir=None):
        raise data.DatasetUnavailable(f"{name}: not in the TFDS cache and the network is unreachable")

    monkeypatch.setattr(data, "load_tfds", offline)
    out = tmp_path / "run"
    image_run.main(TINY + ["--out", str(out)])  # default dataset: MNIST, offline -> sample
    printed = capsys.readouterr().out
    assert "using the offline sample 'mnist-sample'" in printed
    assert set(p.name for p in out.iterdir()) == expected_files([5, 12])
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "mnist-sample" and m["ks"] == [5, 12]
    assert (m["n_train"], m["n_test"]) == (300, 1000)
    assert np.shape(m["train_loss"]) == (2, 2) and np.shape(m["test_mse"]["per_eval"]) == (2, 2)
    assert m["test_mse"]["final"] == [h[-1] for h in m["test_mse"]["per_eval"]]
    assert (m["steps"], m["epochs"], m["step"], m["batching"]) == (6, 2.0, [3, 6], "loop")
    assert m["seconds"] > 0

    ae = ksae_jax.load(out / "params.pkl")
    digits = data.load_mnist_sample()
    recon = ae.reconstruct(digits.x_test[:50], 12)
    mse = np.mean((recon - digits.x_test[:50] / 255.0) ** 2)
    assert mse == pytest.approx(m["test_mse"]["final"][1], rel=0.3)


def test_default_budget_is_the_originals_and_the_samples_is_stated():
    cfg = image_run.sweep_config({}, sample=False)
    assert (cfg.epochs, cfg.steps, cfg.batch_size) == (9, None, 600)
    assert train.make_budget(cfg, 60_000).steps == 900  # the original's 9 x 100 steps
    cfg = image_run.sweep_config({}, sample=True)
    assert (cfg.epochs, cfg.steps, cfg.batch_size) == (None, 700, 200)
    assert "700 steps of batch 200" in image_run.__doc__
    cfg = image_run.sweep_config({"epochs": 3}, sample=True)
    assert (cfg.epochs, cfg.steps, cfg.batch_size) == (3, None, 200)
    cfg = image_run.sweep_config({"steps": 5, "batch_size": 7}, sample=False)
    assert (cfg.epochs, cfg.steps, cfg.batch_size) == (None, 5, 7)
    assert (cfg.ks, cfg.optim.lr, cfg.seed, cfg.model.l1) == ((5, 10, 25, 50, 100), 1e-3, 1, 1e-4)


def test_steps_flag_makes_exactly_that_many_steps(tmp_path):
    out = tmp_path / "run"
    image_run.main(["--dataset", "mnist-sample", "--train-limit", "300", "--ks", "4", "--arch", "mlp",
                 "--hidden", "32", "--steps", "5", "--batch-size", "100", "--no-progress",
                 "--out", str(out)])
    step, meta = latest_checkpoint(out)
    assert step == 5 == meta["step"]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["steps"], m["epochs"], m["step"]) == (5, 5 / 3, [3, 5])


def test_idx_dir_run(idx_dir, tmp_path):
    path, _ = idx_dir
    out = tmp_path / "run"
    image_run.main(["--idx-dir", str(path), "--arch", "mlp", "--hidden", "64", "--ks", "3",
                 "--epochs", "1", "--batch-size", "60", "--l1", "0", "--no-progress",
                 "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "idx" and m["data_source"] == str(path) and m["n_train"] == 120
    assert set(p.name for p in out.iterdir()) == expected_files([3])
