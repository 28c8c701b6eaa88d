"""The main job end to end on a tiny config, and its command-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import latest_checkpoint

import ksae_jax
from experiments import ksweep
from ksae_jax import cli, train
from ksae_jax.data import images as data

ROOT = Path(__file__).resolve().parents[1]
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
    ksweep.main(TINY + ["--out", str(out)])  # default dataset: MNIST, offline -> sample
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
    assert ksweep.default_budget(False) == {"steps": None, "epochs": 9, "batch_size": 600}
    cfg = ksweep.SweepConfig(**ksweep.default_budget(False))
    assert train.make_budget(cfg, 60_000).steps == 900  # the original's 9 x 100 steps
    assert ksweep.default_budget(True) == {"steps": 700, "epochs": None, "batch_size": 200}
    assert "700 steps of batch 200" in ksweep.__doc__
    assert ksweep.default_budget(True, epochs=3) == {"steps": None, "epochs": 3, "batch_size": 200}
    assert ksweep.default_budget(False, steps=5, batch_size=7) == {"steps": 5, "epochs": None,
                                                                  "batch_size": 7}


def test_steps_flag_makes_exactly_that_many_steps(tmp_path):
    out = tmp_path / "run"
    ksweep.main(["--dataset", "mnist-sample", "--train-limit", "300", "--ks", "4", "--arch", "mlp",
                 "--hidden", "32", "--steps", "5", "--batch-size", "100", "--no-progress",
                 "--out", str(out)])
    step, meta = latest_checkpoint(out)
    assert step == 5 == meta["step"]
    m = json.loads((out / "metrics.json").read_text())
    assert (m["steps"], m["epochs"], m["step"]) == (5, 5 / 3, [3, 5])


def test_idx_dir_run(idx_dir, tmp_path):
    path, _ = idx_dir
    out = tmp_path / "run"
    ksweep.main(["--idx-dir", str(path), "--arch", "mlp", "--hidden", "64", "--ks", "3",
                 "--epochs", "1", "--batch-size", "60", "--l1", "0", "--no-progress",
                 "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "idx" and m["data_source"] == str(path) and m["n_train"] == 120
    assert set(p.name for p in out.iterdir()) == expected_files([3])


@pytest.mark.parametrize("flags,message", [
    (["--ks", "0"], "k must be positive, got k=0"),
    (["--ks", "300"], "k=300 is larger than the hidden width 256"),
    (["--ks"], "ks is empty"),
    (["--ks", "2.5"], "expected an integer, got '2.5'"),
    (["--batch-size", "0"], "expected a positive integer, got 0"),
    (["--batch-size", "5000"], "larger than the training set (4000 rows)"),
    (["--steps", "5", "--epochs", "2"], "not allowed with argument"),
    (["--steps", "0"], "expected a positive integer, got 0"),
    (["--lr", "-1"], "expected a finite number >= 0, got -1"),
    (["--l1", "-0.1"], "expected a finite number >= 0, got -0.1"),
    (["--dataset", "no_such_set"], "unknown dataset (choose from mnist, fashion_mnist"),
    (["--idx-dir", "/no/such/dir"], "no such directory"),
    (["--arch", "rnn"], "invalid choice: 'rnn'"),
    (["--tied"], "tied weights exist only for arch 'mlp'"),
    (["--ks", "5", "--aux-coef", "1", "--aux-k", "999"], "aux_k=999 is larger than the hidden"),
])
def test_bad_flags_exit_2_with_one_line(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "load_tfds", lambda *a, **k: (_ for _ in ()).throw(
        data.DatasetUnavailable("offline")))
    argv = ["--dataset", "mnist-sample", "--out", str(tmp_path / "o"), "--no-progress"] + flags
    with pytest.raises(SystemExit) as e:
        cli.run(ksweep.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_out_dir_is_not_overwritten_without_flag(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(SystemExit) as e:
        cli.run(ksweep.main, ["--dataset", "mnist-sample", "--out", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_real_command_line_has_no_traceback():
    r = subprocess.run([sys.executable, "-m", "experiments.ksweep", "--ks", "-4"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "ksweep: error: k must be positive, got k=-4"
    assert "Traceback" not in r.stderr


def test_unwritable_out_and_bad_on_nan(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for flags, message in [(["--out", str(blocker / "sub")], "not writable"),
                           (["--out", str(blocker)], "exists and is not a directory"),
                           (["--on-nan", "ignore"], "invalid choice: 'ignore'")]:
        with pytest.raises(SystemExit) as e:
            cli.run(ksweep.main, ["--dataset", "mnist-sample", "--no-progress"] + flags)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
