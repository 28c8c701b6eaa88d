"""SAEs in and out of the ecosystem's formats: folders that sparsify and SAELens themselves
wrote (tests/fixtures, made by make_interop_fixtures.py) load and reconstruct as those
libraries do; every family exports to SAELens's layout, whose arithmetic (checked here in
NumPy) reconstructs as ours does; bad folders are refused in one line; training continues
from an imported SAE."""
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import ksae_jax
from ksae_jax import cli, sae_config, sae_run, train
from ksae_jax.data import synthetic
from ksae_jax.safe_pickle import ParamsFileError

FIXTURES = Path(__file__).parent / "fixtures"
THIRD_PARTY = ["sparsify_topk", "sparsify_skip_transcoder", "saelens_topk",
               "saelens_topk_no_b_dec_in", "saelens_jumprelu"]


@pytest.mark.parametrize("name", THIRD_PARTY)
def test_folders_written_by_sparsify_and_saelens_reconstruct_as_they_do(name):
    expected = np.load(FIXTURES / name / "expected.npz")
    model = ksae_jax.load(FIXTURES / name)
    assert model.model_config.d_in == 16 and model.model_config.latents == 64
    label = int(expected["k"]) if model.ks else None
    np.testing.assert_allclose(model.reconstruct(expected["x"], label), expected["recon"],
                               rtol=1e-5, atol=1e-5)


def _saelens_forward(folder: Path, x: np.ndarray) -> np.ndarray:
    """SAELens's inference forward (topk / jumprelu, apply_b_dec_to_input) in NumPy."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    pre = (x - t["b_dec"] * cfg["apply_b_dec_to_input"]) @ t["W_enc"] + t["b_enc"]
    if cfg["architecture"] == "topk":
        idx = np.argsort(-pre, axis=1, kind="stable")[:, :cfg["k"]]
        acts = np.zeros_like(pre)
        np.put_along_axis(acts, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    else:
        acts = np.maximum(pre, 0) * (pre > t["threshold"])
    return acts @ t["W_dec"] + t["b_dec"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny sweep of every SAE family, normalised inputs (the scale must be folded in)."""
    x = synthetic.generate(3000, d=16, n_features=24, mean_active=3, seed=0).x * 4 + 1
    out = {}
    for arch, extra in [("topk", {}), ("batchtopk", {}), ("matryoshka", {"prefixes": (8, 32)}),
                        ("jumprelu", {"l0_coefs": (1e-3,)})]:
        ks = () if arch == "jumprelu" else (3,)
        cfg = sae_config(16, ks, latents=64, steps=20, batch_size=256, normalize=True, arch=arch,
                         **extra)
        r = train.train_sweep(cfg, x[:2500], x[2500:], progress=False)
        out[arch] = ksae_jax.load(r.save(tmp_path_factory.mktemp(arch)))
    return out, x[2500:2560]


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "jumprelu"])
def test_every_family_exports_to_saelens_and_reads_back(trained, arch, tmp_path):
    models, x = trained
    model = models[arch]
    label = model.labels[0]
    folder = ksae_jax.export_saelens(model, label, tmp_path / "sl")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if arch == "topk" else "jumprelu")
    assert (cfg["d_in"], cfg["d_sae"], cfg["metadata"]["ksae_jax_arch"]) == (16, 64, arch)
    ours = model.reconstruct(x, label)
    np.testing.assert_allclose(_saelens_forward(folder, x), ours, rtol=1e-4, atol=1e-4)
    again = ksae_jax.load(folder)  # and ksae_jax reads SAELens's format back
    np.testing.assert_allclose(again.reconstruct(x, label if again.ks else None), ours,
                               rtol=1e-4, atol=1e-4)


def _broken(tmp_path, change) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(FIXTURES / "saelens_jumprelu", folder)
    change(folder)
    return folder


def _edit_cfg(folder, **fields):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **fields}))


def _short_threshold(folder):
    from safetensors.numpy import load_file, save_file
    t = load_file(str(folder / "sae_weights.safetensors"))
    save_file({**t, "threshold": t["threshold"][:10]}, str(folder / "sae_weights.safetensors"))


@pytest.mark.parametrize("change,message", [
    (lambda f: (f / "sae_weights.safetensors").unlink(), "neither a ksae_jax export"),
    (lambda f: _edit_cfg(f, d_sae=32), "W_enc has shape (16, 64), but cfg.json says (16, 32)"),
    (_short_threshold, "threshold has shape (10,), but cfg.json says (64,)"),
    (lambda f: _edit_cfg(f, architecture="gated"), "architecture 'gated' is not read"),
])
def test_bad_folders_are_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, change, message):
    folder = _broken(tmp_path, change)
    with pytest.raises(ParamsFileError, match="broken"):
        ksae_jax.load(folder)
    np.save(tmp_path / "x.npy", np.ones((600, 16), np.float32))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sae_run.main(["--data", str(tmp_path / "x.npy"), "--init", str(folder),
                                      "--steps", "2", "--batch-size", "100", "--out", str(out)]),
                "ksae train")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["sparsify_topk", "sparsify_skip_transcoder", "saelens_jumprelu"])
def test_training_continues_from_an_imported_sae(name, tmp_path):
    start = ksae_jax.load(FIXTURES / name)  # a transcoder's rows: [input | output] pairs
    width = start.model_config.input_width
    x = synthetic.generate(3000, d=width, n_features=24, mean_active=3, seed=1).x
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "run"
    sae_run.main(["--data", str(tmp_path / "x.npy"), "--init", str(FIXTURES / name), "--steps", "1",
                  "--batch-size", "256", "--lr", "1e-9", "--out", str(out), "--no-progress"])
    after = ksae_jax.load(out / "params.pkl")
    assert after.model_config.arch == start.model_config.arch and after.labels == start.labels
    for name_, a in start.params.items():  # one step at lr 1e-9: where the import left off
        np.testing.assert_allclose(after.params[name_], a, rtol=1e-4, atol=1e-5, err_msg=name_)
    m = json.loads((out / "metrics.json").read_text())
    assert np.isfinite(m["fvu"]).all()


def test_sparsify_export_refuses_other_families(trained, tmp_path):
    models, _ = trained
    with pytest.raises(ValueError, match="export_saelens takes every SAE"):
        ksae_jax.export_sparsify(models["jumprelu"], None, tmp_path / "sp")
    assert jax.tree.leaves(models["topk"].params)


@pytest.mark.parametrize("given,message", [
    (["--bandwidth", "0.1"], "--bandwidth: not a setting of topk models"),
    (["--init-scale", "1"], "--init-scale: the models start from --init"),
    (["--latents", "32"], "--latents 32: --init"),
    (["--ks", "5"], "--ks [5]: --init"),
    (["--init", str(FIXTURES / "sparsify_skip_transcoder")],
     "takes rows of width 32; the data have d = 16"),  # the later --init: a transcoder's
])
def test_training_on_from_an_sae_refuses_what_it_would_not_apply(tmp_path, capsys, given, message):
    np.save(tmp_path / "x.npy", np.ones((600, 16), np.float32))
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sae_run.main(["--data", str(tmp_path / "x.npy"), "--init",
                                      str(FIXTURES / "sparsify_topk"), "--steps", "1",
                                      "--out", str(tmp_path / "o"), *given]), "ksae train")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def _sparsify_forward(folder: Path, x: np.ndarray) -> np.ndarray:
    """sparsify's SparseCoder forward in NumPy: TopK of ReLU(x W^T + b) (x - b_dec for an SAE),
    decoded, plus the skip map x W_skip^T where there is one."""
    from safetensors.numpy import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae.safetensors"))
    src = x if cfg["transcode"] else x - t["b_dec"]
    pre = np.maximum(src @ t["encoder.weight"].T + t["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :cfg["k"]]
    out = np.einsum("bk,bkd->bd", np.take_along_axis(pre, idx, 1), t["W_dec"][idx]) + t["b_dec"]
    return out + (x @ t["W_skip"].T if cfg["skip_connection"] else 0)


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory):
    """Tiny transcoder and skip-transcoder sweeps on pairs [x | f(x)]."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    pairs = np.concatenate([x, np.tanh(x @ rng.normal(size=(16, 16)) / 4)], axis=1)
    out = {}
    for name, arch, activation in [("transcoder", "transcoder", "topk"),
                                   ("skip-transcoder", "skip-transcoder", "topk"),
                                   ("batchtopk", "transcoder", "batchtopk"),
                                   ("batchtopk-skip", "skip-transcoder", "batchtopk")]:
        cfg = sae_config(16, (3, 5), latents=64, steps=20, batch_size=256, arch=arch,
                         activation=activation)
        r = train.train_sweep(cfg, pairs[:2500], pairs[2500:], progress=False)
        out[name] = ksae_jax.load(r.save(tmp_path_factory.mktemp(name)))
    return out, x[2500:2560]


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder"])
def test_transcoders_export_to_sparsify_and_read_back(transcoders, arch, tmp_path):
    models, x = transcoders
    model = models[arch]
    folder = ksae_jax.export_sparsify(model, 5, tmp_path / "sp")
    want = model.transcode(x, 5)
    np.testing.assert_allclose(_sparsify_forward(folder, x), want, rtol=1e-5, atol=1e-5)
    again = ksae_jax.load(folder)
    assert again.model_config.arch == arch and again.ks == (5,)
    np.testing.assert_allclose(again.transcode(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["transcoder", "skip-transcoder"])
def test_sparsify_itself_loads_exported_transcoders(transcoders, arch, tmp_path):
    """Through sparsify's own SparseCoder where it is installed (a benchmark peer, not a
    dependency; its arithmetic is checked above either way)."""
    sparsify = pytest.importorskip("sparsify")
    import torch
    models, x = transcoders
    coder = sparsify.SparseCoder.load_from_disk(ksae_jax.export_sparsify(models[arch], 3,
                                                                         tmp_path / "sp"))
    with torch.no_grad():
        got = coder(torch.from_numpy(x)).sae_out.numpy()
    np.testing.assert_allclose(got, models[arch].transcode(x, 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["batchtopk", "batchtopk-skip"])
def test_batchtopk_transcoders_export_to_saelens_and_read_back(transcoders, name, tmp_path):
    """SAELens's jumprelu (skip) transcoder: pre = x W_enc + b_enc, ReLU where pre > threshold,
    decoded, plus x W_skip^T; checked in NumPy, by SAELens itself where it is installed, and
    read back."""
    from safetensors.numpy import load_file

    models, x = transcoders
    model = models[name]
    folder = ksae_jax.export_saelens(model, 5, tmp_path / "sl")
    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae_weights.safetensors"))
    pre = x @ t["W_enc"] + t["b_enc"]
    theirs = np.maximum(pre, 0) * (pre > t["threshold"]) @ t["W_dec"] + t["b_dec"]
    theirs = theirs + (x @ t["W_skip"].T if "W_skip" in t else 0)
    want = model.transcode(x, 5)
    np.testing.assert_allclose(theirs, want, rtol=1e-5, atol=1e-5)
    assert not cfg["apply_b_dec_to_input"] and cfg["d_out"] == 16
    np.testing.assert_array_equal(ksae_jax.load(folder).transcode(x), want)
    try:
        import torch
        from sae_lens import SAE
    except ImportError:
        return  # SAELens is a benchmark peer, not a dependency
    with torch.no_grad():
        got = SAE.load_from_disk(folder)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_topk_transcoders_are_not_written_for_saelens(transcoders, tmp_path):
    models, _ = transcoders
    with pytest.raises(ValueError, match="SAELens has no TopK transcoder"):
        ksae_jax.export_saelens(models["transcoder"], 5, tmp_path / "sl")
    with pytest.raises(ValueError, match="sparsify holds"):
        ksae_jax.export_sparsify(models["batchtopk"], 5, tmp_path / "sp")
