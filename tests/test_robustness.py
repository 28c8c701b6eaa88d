"""Crashes, resume, divergence: runs survive kills, files are never half written."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import latest_checkpoint

from ksae_jax import batching, cli, formats, train
from ksae_jax.config import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--arch", "mlp", "--hidden", "64", "--dataset", "mnist-sample", "--train-limit", "1200",
       "--ks", "5", "20", "--steps", "30", "--eval-every", "10", "--batch-size", "100",
       "--no-progress"]  # a step budget of 2.5 epochs; the MLP: kills and resumes do not depend
# on the architecture, and it compiles in a fraction of the conv network's time


def ksweep(args, env=None, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "slow_ksweep.py"), *RUN, *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def wait_for(condition, proc):
    """Polls until condition() holds; fails if the process ends first (no wall-time bound:
    the run ends by itself, so this cannot hang)."""
    while not condition():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)


TMP = ".orbax-checkpoint-tmp"  # how Orbax names a save that is not complete


def assert_no_partial_files(folder: Path):
    """Every file under its final name is complete: it parses or loads; every checkpoint
    under its step's name was committed (a save cut short keeps its temporary name)."""
    for f in folder.iterdir():
        if f.name.startswith("."):
            continue  # a temporary file of an interrupted write, never a result
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".pkl":
            formats.load_params_file(f)
        elif f.suffix == ".png":
            assert f.read_bytes().endswith(b"IEND\xaeB`\x82"), f
    for step in (folder / "checkpoints").iterdir():
        assert TMP in step.name or (step / "commit_success.txt").is_file(), step


def params_of(folder: Path):
    return jax.tree.leaves(formats.load_params_file(folder / "params.pkl")["params"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    finish(ksweep(["--out", str(out)]))
    return out


def test_killed_mid_epoch_then_resumed_equals_uninterrupted(reference, tmp_path):
    out = tmp_path / "run"
    proc = ksweep(["--out", str(out)], env={"KSAE_TEST_STEP_DELAY": "0.1"})
    wait_for(lambda: (out / "checkpoints" / "10").is_dir(), proc)
    time.sleep(0.4)  # into the second segment (10 steps of >= 0.1 s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_no_partial_files(out)
    assert latest_checkpoint(out)[0] in (10, 20)
    assert not (out / "params.pkl").exists()
    finish(ksweep(["--resume", str(out)]))
    for a, b in zip(params_of(out), params_of(reference)):
        np.testing.assert_array_equal(a, b)  # bit for bit
    m, ref = (json.loads((d / "metrics.json").read_text()) for d in (out, reference))
    assert m["test_mse"] == ref["test_mse"] and m["train_loss"] == ref["train_loss"]


def test_killed_while_writing_a_checkpoint(reference, tmp_path):
    out = tmp_path / "run"
    proc = ksweep(["--out", str(out)], env={"KSAE_TEST_SLOW_WRITE": "60"})
    wait_for(lambda: any((out / "checkpoints").glob(f"20{TMP}*")), proc)
    time.sleep(0.2)  # step 20's save is written but not renamed into place: killed mid-save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_no_partial_files(out)
    assert latest_checkpoint(out)[0] == 10  # the previous one, whole
    finish(ksweep(["--resume", str(out)]))
    assert not list((out / "checkpoints").glob(f"*{TMP}*"))  # cleaned up on resume
    for a, b in zip(params_of(out), params_of(reference)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_another_config_is_refused(reference, capsys):
    with pytest.raises(SystemExit) as e:
        from experiments import ksweep as ks
        cli.run(ks.main, RUN[:-7] + ["--steps", "40", "--eval-every", "10", "--batch-size", "100",
                                     "--lr", "0.002", "--no-progress", "--resume", str(reference)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "steps: 30 in the checkpoint, 40 now" in err and "lr: 0.001 in the checkpoint, 0.002 now" in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    from experiments import ksweep as ks
    with pytest.raises(SystemExit) as e:
        cli.run(ks.main, RUN + ["--resume", str(tmp_path)])
    assert e.value.code == 2 and "no checkpoints/ there" in capsys.readouterr().err


# ---------------------------------------------------------------- non-finite losses

@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)


def _blow_up_model_1(monkeypatch):
    init = train.init_state

    def init_with_a_huge_model(cfg, rows=None, params=None, mesh=None):
        state = init(cfg, rows, params, mesh)
        state.params["enc4"]["weight"] = state.params["enc4"]["weight"].at[1].multiply(1e30)
        return state

    monkeypatch.setattr(train, "init_state", init_with_a_huge_model)


def test_diverging_model_is_frozen_and_the_others_train_on(images, monkeypatch):
    _blow_up_model_1(monkeypatch)
    cfg = SweepConfig(ks=(5, 20), epochs=2, batch_size=100)
    r = train.train_sweep(cfg, images, images[:50], progress=False, on_nan="continue")
    assert r.diverged == {20: {"epoch": 1, "step": 1}}
    assert r.history["step"] == [2, 4]
    assert r.history["train_loss"][1] == [None, None] and None not in r.history["train_loss"][0]
    for leaf in jax.tree.leaves(r.params):
        assert np.isfinite(leaf).all()  # never NaN params
    huge = train.init_state(cfg).params  # the patched init: model 1 stays exactly there
    np.testing.assert_array_equal(r.params["enc4"]["weight"][1], huge["enc4"]["weight"][1])
    assert not np.array_equal(r.params["enc4"]["weight"][0], huge["enc4"]["weight"][0])


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(images, monkeypatch, tmp_path):
    cfg = SweepConfig(ks=(5, 20), epochs=3, batch_size=100)
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
    from experiments import ksweep as ks
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(ks.main, RUN[:-7] + ["--epochs", "2", "--batch-size", "100", "--lr", "1e30",
                                     "--no-progress", "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ksweep: error: non-finite loss or outputs: k=5 at step ") and "\n" not in err
    assert not (out / "params.pkl").exists()


def test_training_entry_points_check_their_arrays(images):
    cfg = SweepConfig(ks=(5,), epochs=1, batch_size=100)
    with pytest.raises(ValueError, match=r"train must be a non-empty uint8 array of shape \(N, 28, 28\), got float64"):
        train.train_sweep(cfg, images / 255.0)
    with pytest.raises(ValueError, match="test must be"):
        train.train_sweep(cfg, images, images[:, :14])
    with pytest.raises(ValueError, match="on_nan"):
        train.train_sweep(cfg, images, on_nan="ignore")
