"""Params files: the round trip, refusal of unsafe, hostile or damaged files (never a hang,
a traceback or a silently wrong result), atomic writes, and files of earlier versions."""
import io
import os
import pickle
import pickletools
from pathlib import Path

import jax
import numpy as np
import pytest

import ksae_jax
from ksae_jax import files, formats, models, safe_pickle, step, train
from ksae_jax.config import ImageModel, SweepConfig
from ksae_jax.safe_pickle import ParamsFileError

FIXTURES = Path(__file__).parent / "fixtures"
MLP = SweepConfig(model=ImageModel("mlp", hidden=16), ks=(2, 4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits):
    cfg = SweepConfig(ks=(5, 20), epochs=1, batch_size=100)
    r = train.train_sweep(cfg, digits.x_train[:300], digits.x_test[:100], progress=False)
    path = r.save(tmp_path_factory.mktemp("run"), metrics={"test_mse": r.history["eval_mse"]})
    return path, cfg, r


def test_round_trip_gives_identical_reconstructions(saved, digits):
    path, cfg, r = saved
    ae = ksae_jax.load(path)
    in_memory = ksae_jax.Autoencoder(cfg, r.params)
    assert ae.ks == (5, 20) and ae.config == cfg
    x = digits.x_test[:16]
    for i, k in enumerate(cfg.ks):
        np.testing.assert_array_equal(ae.reconstruct(x, k), in_memory.reconstruct(x, k))
        p = jax.tree.map(lambda a: a[i], r.params)
        x01 = x.astype(np.float32) / 255
        want = models.family(cfg.model).forward(p, x01, np.ones(len(x)), {"k": k}, k).recon
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


@pytest.fixture(scope="module")
def good_payload():
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


# ---------------------------------------------------------------- the Python API

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from ksae_jax.data.images import load_mnist_sample
    ds = load_mnist_sample()
    cfg = SweepConfig(model=ImageModel("mlp", hidden=32), ks=(4, 8), steps=5, batch_size=100)
    r = train.train_sweep(cfg, ds.x_train[:500], progress=False)
    return ksae_jax.Autoencoder(cfg, r.params), ds.x_test[:8]


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


# ---------------------------------------------------------------- files of earlier versions

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


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_files_of_the_flat_layout_load_and_reconstruct_the_same(name):
    """Params files written before the configs were split by concern (one flat SweepConfig,
    the latents called hidden): read into today's layout, they reconstruct as they did."""
    sae = ksae_jax.load(FIXTURES / "flat" / name / "params.pkl")
    assert sae.model_config.arch == name and sae.model_config.latents == 16
    x = np.load(FIXTURES / "v0.2_vectors.npy")[:5]
    np.testing.assert_allclose(sae.reconstruct(x, sae.labels[-1]),
                               np.load(FIXTURES / "flat" / name / "recon.npy"), rtol=1e-5, atol=1e-6)
    cfg = sae.config
    assert cfg.model.aux_coef == 1 / 32 and cfg.optim.adam_eps == 6.25e-10  # moved, not lost
    assert formats.read_config(cfg.to_dict()) == cfg  # and today's layout reads back as it is


def test_the_flat_image_layout_loads_and_reconstructs_the_same(digits):
    ae = ksae_jax.load(FIXTURES / "flat" / "mlp" / "params.pkl")
    assert ae.config.model == ImageModel("mlp", hidden=16, tied=True, l1=0.0) and ae.ks == (2, 4)
    assert (ae.config.optim.lr, ae.config.execution.batching) == (1e-3, "auto")
    np.testing.assert_allclose(ae.reconstruct(digits.x_test[:4], 4),
                               np.load(FIXTURES / "flat" / "mlp" / "recon_k4.npy"), rtol=1e-5, atol=1e-6)


def test_read_config_moves_every_field_of_the_flat_layout():
    flat = {"model": {"d_in": 8, "hidden": 32, "arch": "batchtopk", "decoder": "auto",
                      "multi_topk": False, "normalize": True, "threshold_lr": 0.02},
            "ks": [2, 4], "l0_coefs": [], "epochs": None, "steps": 10, "batch_size": 64,
            "lr": [1e-3, 2e-3], "seed": 5, "init_seeds": None, "k_start": 8, "k_anneal_frac": 0.5,
            "batching": "vmap", "optimizer": "adam", "momentum": 0.9, "eps": 1e-7,
            "warmup_steps": 3, "lr_decay_frac": 0.1, "clip_norm": 1.0, "aux_coef": 0.5,
            "aux_k": 4, "dead_tokens": 100, "resample_every": 2, "eval_every": 5}
    cfg = formats.read_config(flat)
    m, o = cfg.model, cfg.optim
    assert (m.arch, m.latents, m.normalize, m.threshold_lr) == ("batchtopk", 32, True, 0.02)
    assert (m.aux_coef, m.aux_k, m.dead_tokens, m.resample_every) == (0.5, 4, 100, 2)
    assert (m.b_dec_init, m.init_scale, m.init_dirs, m.b_enc_init) == ("median", 1.0, "random", "zero")
    assert (o.lr, o.adam_eps, o.warmup_steps, o.lr_decay_frac, o.clip_norm) == \
        ((1e-3, 2e-3), 1e-7, 3, 0.1, 1.0)
    assert (o.k_start, o.k_anneal_frac, cfg.execution.batching, cfg.execution.eval_every) == \
        (8, 0.5, "vmap", 5)
    assert (cfg.ks, cfg.steps, cfg.batch_size, cfg.seed) == ((2, 4), 10, 64, 5)
