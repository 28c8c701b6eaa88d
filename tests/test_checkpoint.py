"""Params files: round trip, refusal of unsafe or damaged files, atomic writes, files of
earlier versions."""
import dataclasses
import os
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import ksae_jax
from ksae_jax import files, formats, models, safe_pickle, train
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.safe_pickle import ParamsFileError


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits):
    cfg = SweepConfig(ks=(5, 20), epochs=1, batch_size=100)
    r = train.train_sweep(cfg, digits.x_train[:300], digits.x_test[:100], progress=False)
    path = r.save(tmp_path_factory.mktemp("run"), metrics={"test_mse": r.history["eval_mse"]})
    return path, cfg, r


def test_round_trip_gives_identical_reconstructions(saved, digits):
    path, cfg, r = saved
    ae = ksae_jax.load(path)
    in_memory = ksae_jax.Autoencoder(cfg, cfg.ks, r.params)
    assert ae.ks == (5, 20) and ae.config == cfg
    x = digits.x_test[:16]
    for i, k in enumerate(cfg.ks):
        np.testing.assert_array_equal(ae.reconstruct(x, k), in_memory.reconstruct(x, k))
        p = jax.tree.map(lambda a: a[i], r.params)
        x01 = x.astype(np.float32) / 255
        want = models.family(cfg.model).forward(p, x01, np.ones(len(x)), k, k).recon
        np.testing.assert_allclose(ae.reconstruct(x, k), want, rtol=1e-5, atol=1e-6)
        code = ae.encode(x, k)
        assert (np.count_nonzero(code, axis=1) <= k).all()
        np.testing.assert_array_equal(ae.decode(code, k), ae.reconstruct(x, k))
    assert ae.encode(x, 5, n_active=15).shape == (16, 256)


def test_loaded_model_checks_its_inputs(saved):
    ae = ksae_jax.load(saved[0])
    with pytest.raises(ValueError, match="no model for k=7"):
        ae.reconstruct(np.zeros((2, 28, 28), np.uint8), 7)
    with pytest.raises(ValueError, match=r"shape \(N, 28, 28\)"):
        ae.encode(np.zeros((2, 784), np.float32), 5)
    with pytest.raises(ValueError, match="dtype"):
        ae.encode(np.zeros((2, 28, 28), np.int64), 5)
    with pytest.raises(ValueError, match=r"code must have shape \(N, 256\)"):
        ae.decode(np.zeros((2, 10)), 5)
    assert ae.reconstruct(np.zeros((28, 28), np.uint8), 5).shape == (1, 28, 28)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "params.pkl"
    bad.write_bytes(pickle.dumps({"format": formats.PARAMS_FORMAT, "version": 1,
                                  "params": _RunsShell(marker)}))
    with pytest.raises(ParamsFileError, match=r"refused to load (posix|os)\.system"):
        ksae_jax.load(bad)
    assert not marker.exists()
    pickle.loads(bad.read_bytes())  # the plain unpickler would have run it: the test can fail
    assert marker.exists()


def test_damaged_files_give_one_clear_error(saved, tmp_path):
    good = saved[0].read_bytes()
    cases = {
        "truncated.pkl": good[: len(good) // 2],
        "empty.pkl": b"",
        "garbage.pkl": b"not a pickle at all",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ParamsFileError, match=name):
            ksae_jax.load(tmp_path / name)
    with pytest.raises(ParamsFileError, match="file not found"):
        ksae_jax.load(tmp_path / "missing.pkl")


def test_wrong_version_or_format_is_refused(saved, tmp_path):
    payload = safe_pickle.read_pickle(saved[0])
    del payload["sha256"]
    for change, match in [({"version": 99}, "version 99 is not supported"),
                          ({"format": "other"}, "not a ksae_jax params file")]:
        path = tmp_path / "p.pkl"
        files.write_pickle(path, safe_pickle.with_digest({**payload, **change}))
        with pytest.raises(ParamsFileError, match=match):
            ksae_jax.load(path)
    wrong_cfg = {**payload, "config": SweepConfig(model=ImageModel("mlp"), ks=(5, 20)).to_dict()}
    files.write_pickle(tmp_path / "p.pkl", safe_pickle.with_digest(wrong_cfg))
    with pytest.raises(ParamsFileError, match="do not match"):
        ksae_jax.load(tmp_path / "p.pkl")


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"a": 1})

    def failing(f):
        f.write(b'{"half": ')
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        files.atomic_write(path, failing)
    assert path.read_text() == '{\n "a": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary left behind


def test_written_files_get_ordinary_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = files.write_json(tmp_path / "m.json", {})
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


FIXTURES = Path(__file__).parent / "fixtures"


def test_files_of_version_0_2_still_load_and_reconstruct_the_same(digits):
    ae = ksae_jax.load(FIXTURES / "v0.2_mlp_params.pkl")
    assert ae.config.model == ImageModel("mlp", hidden=16, tied=True, l1=0.0) and ae.ks == (2, 4)
    np.testing.assert_allclose(ae.reconstruct(digits.x_test[:4], 4),
                               np.load(FIXTURES / "v0.2_mlp_recon_k4.npy"), rtol=1e-5, atol=1e-6)
    sae = ksae_jax.load(FIXTURES / "v0.2_sae_params.pkl")
    assert sae.model_config.normalize and sae.model_config.multi_topk and sae.input_scale != 1
    x = np.load(FIXTURES / "v0.2_vectors.npy")[:5]
    np.testing.assert_allclose(sae.reconstruct(x, 3), np.load(FIXTURES / "v0.2_sae_recon_k3.npy"),
                               rtol=1e-5, atol=1e-6)


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
