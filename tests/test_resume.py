"""Checkpoints and resume: runs survive kills (mid-step and mid-save) and resume bit for bit;
checkpoints of earlier versions resume; a checkpoint that cannot serve is refused in one line."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import latest_checkpoint
from test_files import _laughs, _object_scalar_pickle

import ksae_jax
from ksae_jax import cli, formats, image_run, sae_run, train
from ksae_jax.config import ImageModel, SweepConfig

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


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
    """The uninterrupted run (in this process; the runs that are killed are processes)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    image_run.main([*RUN, "--out", str(out)])
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


def ksweep_in_process(argv):
    cli.run(lambda: image_run.main(argv), "ksweep")


def test_resume_with_another_config_is_refused(reference, capsys):
    with pytest.raises(SystemExit) as e:
        ksweep_in_process(RUN[:-7] + ["--steps", "40", "--eval-every", "10", "--batch-size", "100",
                                      "--lr", "0.002", "--no-progress", "--resume", str(reference)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "steps: 30 in the checkpoint, 40 now" in err
    assert "optim.lr: 0.001 in the checkpoint, 0.002 now" in err


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ksweep_in_process(RUN + ["--resume", str(tmp_path)])
    assert e.value.code == 2 and "no checkpoints/ there" in capsys.readouterr().err


def test_checkpoint_of_version_0_2_resumes(digits, tmp_path):
    shutil.copy(FIXTURES / "v0.2_mlp_checkpoint.pkl", tmp_path / "checkpoint.pkl")
    ckpt = tmp_path / "checkpoints"  # none there yet: the 0.2 checkpoint.pkl beside it resumes
    cfg = SweepConfig(model=ImageModel("mlp", hidden=16, tied=True, l1=0.0), ks=(2, 4), steps=5,
                      batch_size=50)
    with pytest.raises(train.CheckpointMismatch, match="steps: 3 in the checkpoint, 5 now"):
        train.train_sweep(cfg, digits.x_train[:100], progress=False, checkpoint=ckpt, resume=True)
    done = train.train_sweep(dataclasses.replace(cfg, steps=3), digits.x_train[:100],
                             progress=False, checkpoint=ckpt, resume=True)
    assert done.history["step"] == [2, 3] and done.budget.steps == 3


def test_bad_checkpoints_end_resume_with_one_line(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    for content in (b"garbage", _laughs(), _object_scalar_pickle()):
        (folder / "checkpoint.pkl").write_bytes(content)
        with pytest.raises(SystemExit) as e:
            ksweep_in_process(["--dataset", "mnist-sample", "--steps", "2", "--resume", str(folder),
                           "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "checkpoint.pkl" in err, err


def test_a_damaged_sharded_checkpoint_ends_resume_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp", "--hidden", "16",
             "--ks", "3", "--steps", "2", "--batch-size", "100", "--no-progress"]
    image_run.main(flags + ["--out", str(run)])
    step = run / "checkpoints" / "2"
    for f in (step / "meta").iterdir():
        f.write_bytes(b"{not json")
    with pytest.raises(SystemExit) as e:
        ksweep_in_process(flags + ["--resume", str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unreadable checkpoint" in err, err


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_checkpoints_of_the_flat_layout_resume_to_the_uninterrupted_params(name, tmp_path):
    """The first half of a run written before the configs were split by concern (its
    checkpoint's config in the flat layout) resumes, with the config read back from its
    params.pkl, to that run's final params, bit for bit."""
    folder = tmp_path / name
    shutil.copytree(FIXTURES / "flat" / name, folder)
    cfg = ksae_jax.load(folder / "params.pkl").config
    x = np.load(FIXTURES / "v0.2_vectors.npy")
    r = train.train_sweep(cfg, x[:200], x[200:], progress=False, checkpoint=folder / "checkpoints",
                          resume=True)
    assert r.history["step"] == [3, 6]
    want = formats.load_params_file(FIXTURES / "flat" / name / "params.pkl")["params"]
    for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


SAE_RUN = ["--latents", "32", "--ks", "2", "4", "--steps", "4", "--batch-size", "100",
           "--no-progress"]


def sae_in_process(argv):
    cli.run(lambda: sae_run.main(argv), "ksae train")


def test_resume_of_an_sae_run_with_other_shapes_or_damaged_files_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "v.npy", np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32))
    run = tmp_path / "run"
    sae_run.main(["--data", str(tmp_path / "v.npy"), *SAE_RUN, "--out", str(run)])
    capsys.readouterr()
    cases = [(["--latents", "64"], "model.latents: 32 in the checkpoint, 64 now")]
    for argv, message in cases:  # refused before any array is read
        with pytest.raises(SystemExit) as e:
            sae_in_process(["--data", str(tmp_path / "v.npy"), *SAE_RUN, *argv,
                            "--resume", str(run)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, err
    for f in (run / "checkpoints" / "4").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")  # every file of the Orbax checkpoint
    with pytest.raises(SystemExit) as e:
        sae_in_process(["--data", str(tmp_path / "v.npy"), *SAE_RUN, "--resume", str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unreadable checkpoint" in err, err
    old = tmp_path / "old"  # a garbage checkpoint of an earlier version: nothing added
    old.mkdir()
    (old / "checkpoint.pkl").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        sae_in_process(["--data", str(tmp_path / "v.npy"), *SAE_RUN, "--resume", str(old)])
    assert e.value.code == 2 and [p.name for p in old.iterdir()] == ["checkpoint.pkl"]
