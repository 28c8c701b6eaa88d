"""Hostile or odd params files and inputs: a clear refusal, never a hang, a traceback or a
silently wrong result."""
import io
import json
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ksae_jax
from experiments import ksweep
from ksae_jax import cli, files, formats, safe_pickle
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.safe_pickle import ParamsFileError

ROOT = Path(__file__).resolve().parents[1]
MLP = SweepConfig(model=ImageModel("mlp", hidden=16), ks=(2, 4))


@pytest.fixture(scope="module")
def good_payload():
    from ksae_jax import step
    params = step.init_state(MLP).params
    return {"format": formats.PARAMS_FORMAT, "version": formats.PARAMS_VERSION,
            "config": MLP.to_dict(), "ks": [2, 4],
            "params": {k: {n: np.asarray(a) for n, a in v.items()} for k, v in params.items()},
            "metrics": {}}


def _write(tmp_path, payload, name="p.pkl", sign=True):
    path = tmp_path / name
    files.write_pickle(path, safe_pickle.with_digest(payload) if sign else payload)
    return path


# ---------------------------------------------------------------- structure bombs

def _laughs(levels=30):
    """A pickle of under 1 kB whose lists share references: 10^30 nodes when expanded."""
    out = io.BytesIO()
    out.write(b"\x80\x04]\x940")  # PROTO 4; an empty list, memo 0; POP
    for i in range(levels):  # MARK, 10 x memo[i], LIST, memo[i + 1], POP
        out.write(b"(" + (b"h" + bytes([i])) * 10 + b"l\x940")
    out.write(b"h" + bytes([levels]) + b".")
    return out.getvalue()


def test_structure_bombs_are_refused_fast(tmp_path):
    bomb = tmp_path / "laughs.pkl"
    bomb.write_bytes(_laughs())
    assert len(bomb.read_bytes()) < 2000
    pickletools.dis(bomb.read_bytes(), out=io.StringIO())  # a valid pickle
    with pytest.raises(ParamsFileError, match="laughs.pkl: not loaded: structure expands"):
        ksae_jax.load(bomb)
    # the work is bounded by the distinct objects (31 lists of 10 references), not by the
    # 10^30 nodes the structure expands to: the check enters each list once
    loaded = pickle.loads(bomb.read_bytes())  # only shared references: small in memory
    assert safe_pickle.check_plain(loaded, max_nodes=10 ** 40) < 1000
    cyclic = []
    cyclic.append(cyclic)
    selfdict = {}
    selfdict["me"] = selfdict
    deep = b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b"."  # lists nested 100,000 deep
    for name, data, match in [("cycle.pkl", pickle.dumps(cyclic, protocol=4), "contains itself"),
                              ("dict.pkl", pickle.dumps(selfdict, protocol=4), "contains itself"),
                              ("deep.pkl", deep, "nested more than")]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ParamsFileError, match=match):
            safe_pickle.read_pickle(path)


def test_shared_references_that_stay_small_are_fine(tmp_path, good_payload):
    shared = [1.0, 2.0]
    payload = dict(good_payload, metrics={"a": shared, "b": shared})
    assert ksae_jax.load(_write(tmp_path, payload)).metrics["a"] == [1.0, 2.0]


# ---------------------------------------------------------------- numpy callables abused

def _object_scalar_pickle() -> bytes:
    """numpy.core.multiarray.scalar(dtype([('a', 'O')]), b'...'): an object field from raw bytes."""
    dt = np.dtype([("a", "O")])
    body = pickle.dumps(dt, protocol=2)[2:-1]  # the dtype, without PROTO and STOP
    return (b"\x80\x04\x8c\x16numpy._core.multiarray\x8c\x06scalar\x93" + body +
            b"C\x08AAAAAAAA\x86R.")


def test_object_dtypes_are_refused_before_numpy_sees_them(tmp_path):
    cases = {"objscalar.pkl": _object_scalar_pickle(),
             "objarray.pkl": pickle.dumps(np.array([1, "a"], dtype=object), protocol=4),
             "objdtype.pkl": pickle.dumps(np.dtype("O"), protocol=4),
             "structured.pkl": pickle.dumps(np.zeros(2, dtype=[("x", "f4"), ("o", "O")]), protocol=4)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ParamsFileError, match=f"{name}: not loaded: refused"):
            safe_pickle.read_pickle(tmp_path / name)


@pytest.mark.parametrize("data", [b"\x80\x04K\x01\x94h\x05.",                 # memo get of nothing
                                  b"\x80\x04\x8c\x05numpy\x8c\x05dtype\x93\x8c\x02zz\x85R.",  # bad dtype
                                  b"\x80\x04(((((((((((.",                      # marks, no stop
                                  pickle.dumps(np.ones(3), protocol=4)[:-30] + b"."])
def test_every_loader_exception_becomes_params_file_error(tmp_path, data):
    path = tmp_path / "odd.pkl"
    path.write_bytes(data)
    with pytest.raises(ParamsFileError, match="odd.pkl"):
        safe_pickle.read_pickle(path)


# ---------------------------------------------------------------- wrong content

@pytest.mark.parametrize("change,match", [
    (lambda p: p.update(ks="2, 4"), "'ks' must be a list of integers"),
    (lambda p: p.update(ks=4), "'ks' must be a list of integers"),
    (lambda p: p.update(ks=[2.0, 4.0]), "'ks' must be a list of integers"),
    (lambda p: p.update(ks=[2, 2]), "'ks' must be distinct integers in 1..16"),
    (lambda p: p.update(ks=[-2, 4]), "'ks' must be distinct integers in 1..16"),
    (lambda p: p.update(ks=[2, 40]), "'ks' must be distinct integers in 1..16"),
    (lambda p: p.update(ks=[4, 2]), r"'ks' \[4, 2\] are not the config's ks \[2, 4\]"),
    (lambda p: p["params"]["enc"].update(weight=p["params"]["enc"]["weight"].astype(np.int32)),
     r"params\['enc'\]\['weight'\] has dtype int32; expected float32"),
    (lambda p: p["params"]["enc"].update(weight=p["params"]["enc"]["weight"].astype(np.float16)),
     "has dtype float16"),
    (lambda p: p["params"]["enc"].update(weight=p["params"]["enc"]["weight"].astype(np.complex64)),
     "has dtype complex64"),
    (lambda p: p["params"]["enc"].update(bias=np.full((2, 16), np.nan, np.float32)),
     r"params\['enc'\]\['bias'\] holds NaN or Inf"),
    (lambda p: p["params"]["enc"].update(bias=np.full((2, 16), np.inf, np.float32)), "holds NaN or Inf"),
    (lambda p: p["config"].update(ks=[2, 5]), "not the config's ks"),
    (lambda p: p.update(input_scale="big"), "input_scale must be a positive float"),
])
def test_wrong_content_is_refused_naming_the_field(tmp_path, good_payload, change, match):
    payload = pickle.loads(pickle.dumps(good_payload))
    change(payload)
    with pytest.raises(ParamsFileError, match=match):
        ksae_jax.load(_write(tmp_path, payload))


def test_float64_params_are_cast_with_a_warning(tmp_path, good_payload):
    payload = pickle.loads(pickle.dumps(good_payload))
    payload["params"]["enc"]["weight"] = payload["params"]["enc"]["weight"].astype(np.float64)
    with pytest.warns(UserWarning, match="float64; cast to float32"):
        model = ksae_jax.load(_write(tmp_path, payload))
    assert model.params["enc"]["weight"].dtype == np.float32


def test_corrupted_array_bytes_are_detected(tmp_path, good_payload):
    path = _write(tmp_path, good_payload)
    raw = bytearray(path.read_bytes())
    weight = good_payload["params"]["enc"]["weight"].tobytes()
    at = bytes(raw).index(weight[:64])
    raw[at + 100:at + 164] = np.random.default_rng(0).bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(ParamsFileError, match="checksum mismatch"):
        ksae_jax.load(path)
    old = dict(good_payload, version=1)  # version 1 files carry no checksum and still load
    assert ksae_jax.load(_write(tmp_path, old, "v1.pkl", sign=False)).ks == (2, 4)
    assert formats.load_params_file(tmp_path / "v1.pkl")["checksum"].startswith("none")


def test_bad_checkpoints_end_resume_with_one_line(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    for content in (b"garbage", _laughs(), _object_scalar_pickle()):
        (folder / "checkpoint.pkl").write_bytes(content)
        with pytest.raises(SystemExit) as e:
            cli.run(ksweep.main, ["--dataset", "mnist-sample", "--steps", "2", "--resume", str(folder),
                                  "--no-progress"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "checkpoint.pkl" in err, err


def test_a_damaged_sharded_checkpoint_ends_resume_with_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp", "--hidden", "16",
             "--ks", "3", "--steps", "2", "--batch-size", "100", "--no-progress"]
    ksweep.main(flags + ["--out", str(run)])
    step = run / "checkpoints" / "2"
    for f in (step / "meta").iterdir():
        f.write_bytes(b"{not json")
    with pytest.raises(SystemExit) as e:
        cli.run(ksweep.main, flags + ["--resume", str(run)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unreadable checkpoint" in err, err


# ---------------------------------------------------------------- the CLI

def test_a_run_that_diverges_on_its_only_step_fails(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        cli.run(ksweep.main, ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp",
                              "--hidden", "16", "--ks", "3", "--steps", "1", "--batch-size", "100",
                              "--lr", "1e38", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "non-finite" in err
    assert not out.exists()  # the run made the folder and wrote nothing into it: removed
    with pytest.raises(SystemExit) as e:
        cli.run(ksweep.main, ["--dataset", "mnist-sample", "--train-limit", "200", "--arch", "mlp",
                              "--hidden", "16", "--ks", "3", "--steps", "1", "--batch-size", "100",
                              "--lr", "1e38", "--on-nan", "continue", "--no-progress", "--out",
                              str(out), "--overwrite"])
    assert e.value.code == 1 and not (out / "params.pkl").exists()
    text = (out / "metrics.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert "NaN" not in text and "Infinity" not in text


def test_data_errors_leave_no_output_folder(tmp_path, capsys):
    bad_idx = tmp_path / "idx"
    bad_idx.mkdir()
    (bad_idx / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03")
    for flags in (["--idx-dir", str(bad_idx)], ["--idx-dir", str(tmp_path / "none")],
                  ["--dataset", "nonsense"]):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as e:
            cli.run(ksweep.main, flags + ["--out", str(out), "--no-progress"])
        assert e.value.code == 2 and not out.exists()
        capsys.readouterr()


def test_unknown_dataset_is_refused_before_tensorflow_is_imported():
    """The refusal happens before TensorFlow (TFDS) is imported: nothing slow, no TF noise."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['ksweep', '--dataset', 'nonsense']\n"
             "try:\n    runpy.run_module('experiments.ksweep', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    tf = any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') for m in sys.modules)\n"
             "    print('exit', e.code, 'tensorflow' if tf else 'no tensorflow')\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "exit 2 no tensorflow", (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "unknown dataset" in r.stderr, r.stderr


# ---------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ksae_jax import train
    from ksae_jax.data.images import load_mnist_sample
    ds = load_mnist_sample()
    r = train.train_sweep(SweepConfig(model=ImageModel("mlp", hidden=32), ks=(4, 8), steps=5,
                                      batch_size=100), ds.x_train[:500], progress=False)
    return ksae_jax.Autoencoder(SweepConfig(model=ImageModel("mlp", hidden=32), ks=(4, 8), steps=5,
                                            batch_size=100), (4, 8), r.params), ds.x_test[:8]


def test_api_refuses_inputs_it_would_get_wrong(model):
    ae, x = model
    for bad, match in [(x.astype(np.float32), r"float pixels must lie in \[0, 1\], got \[0, 255\]"),
                       (x / 127.5 - 1, r"must lie in \[0, 1\]"),
                       (np.where(x > 0, np.nan, 0.0), "NaN or Inf"),
                       (x.astype(np.int64), "uint8 pixels")]:
        with pytest.raises(ValueError, match=match):
            ae.encode(bad, 4)
    with pytest.raises(ValueError, match="k must be an integer, got 5.0"):
        ae.encode(x, 5.0)
    with pytest.raises(ValueError, match="no model for k=5"):
        ae.encode(x, 5)
    half = x.astype(np.float16) / np.float16(255)  # float16 is cast
    np.testing.assert_array_equal(ae.encode(half, 4), ae.encode(half.astype(np.float32), 4))
    assert ae.encode(x[:0], 4).shape == (0, 32) and ae.reconstruct(x[:0], 4).shape == (0, 28, 28)
    code = ae.encode(x[0], 4)
    assert code.shape == (1, 32)
    np.testing.assert_array_equal(ae.decode(code[0], 4), ae.decode(code, 4))  # one code, 1-D


def test_keep_top_k_drops_infinities_to_exact_zeros():
    z = np.array([[3.0, -np.inf, 1.0, np.inf, -2.0], [-np.inf] * 5])
    out = np.asarray(ksae_jax.keep_top_k(z, 2))
    np.testing.assert_array_equal(out[0], [3.0, 0, 0, np.inf, 0])
    assert not np.isnan(out).any()
