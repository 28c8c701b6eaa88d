"""Transcoders and CLTs trained live on a tiny GPT-2: the pair hookpoint reads what torch's
MLP reads and writes (in both backends), the spliced metrics agree between the two splices
(the clean pass's rows and the replaced forward), exports per layer, caches of MLP pairs,
and a bad request is one line and exit 2."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the lm extra: .ci/run installs requirements-lm.txt
pytest.importorskip("transformers")

import ksae_jax  # noqa: E402
from ksae_jax import export as exports  # noqa: E402
from ksae_jax import sae_run  # noqa: E402
from ksae_jax.lm import hookpoints as hooks  # noqa: E402
from ksae_jax.lm import jax_lm, replacement  # noqa: E402
from ksae_jax.lm import model as lm_model  # noqa: E402
from ksae_jax.lm.splice import SpliceEval, sae_replacement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--text", str(ROOT / "README.md"), "--latents", "64", "--ks", "4", "8", "--tokens", "640",
       "--batch-size", "64", "--heldout-tokens", "60", "--context", "16", "--lm-batch", "4",
       "--buffer-tokens", "256", "--lm-tokens", "60", "--no-progress"]


@pytest.fixture
def lm_dir(tiny_lm):
    return tiny_lm[0]  # conftest's GPT-2: 2 blocks, d 32, 16 positions


def test_the_pair_hookpoint_is_the_mlps_input_beside_its_output(lm_dir):
    model, _ = lm_model.load(str(lm_dir))
    ids = np.random.default_rng(0).integers(0, 400, (2, 16))
    got = hooks.capture(model, hooks.resolve(model, ["mlp.1", "mlp_in.1", "mlp_out.1"]),
                        torch.from_numpy(ids))
    assert got["mlp.1"].shape[-1] == 64
    torch.testing.assert_close(got["mlp.1"], torch.cat([got["mlp_in.1"], got["mlp_out.1"]], -1))
    lm = jax_lm.load(lm_dir)
    _, acts = lm(ids, hookpoints=("mlp.1", "mlp.0+1"))
    np.testing.assert_allclose(acts["mlp.1"], got["mlp.1"].numpy(), rtol=1e-4, atol=1e-5)
    assert acts["mlp.0+1"].shape[-1] == 128
    np.testing.assert_array_equal(acts["mlp.0+1"][..., 64:], acts["mlp.1"])


def test_live_transcoders_report_each_layer_and_the_replacement_and_the_splices_agree(
        lm_dir, tmp_path):
    """(The pair rows are the same from either backend: the test above; the same rows train
    the same models whatever their source: tests/test_live.py.)"""
    sae_run.main(["--model", str(lm_dir), "--arch", "skip-transcoder", "--layers", "0", "1",
                  "--lm-backend", "jax", "--out", str(tmp_path / "jax")] + RUN)
    m = json.loads((tmp_path / "jax" / "metrics.json").read_text())
    for h in ("mlp.0", "mlp.1"):
        assert np.isfinite(m["hookpoints"][h]["delta_loss"]).all()
    assert len(m["replacement"]["replacement_delta_loss"]) == 2  # per k
    # one layer replaced in the replaced forward = the spliced evaluation of that layer
    lm = jax_lm.load(lm_dir)
    models = ksae_jax.load(tmp_path / "jax" / "mlp.1" / "params.pkl")
    tokenizer = lm_model.load(str(lm_dir))[1]
    where = hooks.Hookpoint("mlp.1", "mlp.1", "jax")
    ev = SpliceEval.at(lm, tokenizer, where, [(ROOT / "README.md").read_text()], 60, 16, "tiny")
    alone = ev.losses({"8": sae_replacement(models, 8, lm)})
    got = replacement.losses(lm, ev.windows, ev.nbytes,
                             {"8": [(1, replacement.coder_of(models, "mlp.1", 8))]})
    assert got["8"]["loss"] == pytest.approx(alone["8"]["loss"], rel=1e-5)
    assert got["8"]["kl"] == pytest.approx(alone["8"]["kl"], rel=1e-3, abs=1e-6)
    # `ksae export RUN --format sparsify`: one folder per layer, read back as trained
    out = exports.export(exports.ExportConfig(params=tmp_path / "jax", format="sparsify", model="8"))
    x = np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32)
    np.testing.assert_allclose(ksae_jax.load(out / "mlp.1").transcode(x), models.transcode(x, 8),
                               rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["mlp.0", "mlp.1"]


def test_a_live_clt_reports_each_layer_and_the_replacement_model(lm_dir, tmp_path, capsys):
    sae_run.main(["--model", str(lm_dir), "--arch", "clt", "--layers", "0", "1",
                  "--out", str(tmp_path / "clt")] + RUN)
    m = json.loads((tmp_path / "clt" / "metrics.json").read_text())["hookpoints"]["mlp.0+1"]
    assert np.shape(m["layer_fvu"]) == (2, 2) and np.shape(m["layer_delta_loss"]) == (2, 2)
    assert m["replacement_delta_loss"] == m["delta_loss"]
    np.testing.assert_allclose(np.sum(m["layer_l0"], 1), m["l0"], rtol=1e-6)
    assert "every layer replaced" in capsys.readouterr().out
    clt = ksae_jax.load(tmp_path / "clt" / "mlp.0+1" / "params.pkl")
    assert clt.model_config.n_layers == 2 and clt.model_config.d_in == 32
    # the CLT's safetensors layout (docs/transcoders.md) reads back as trained
    folder = exports.export(exports.ExportConfig(params=tmp_path / "clt"))
    again = ksae_jax.load(folder / "mlp.0+1")
    rows = np.random.default_rng(0).normal(size=(20, 128)).astype(np.float32)
    np.testing.assert_array_equal(again.reconstruct(rows, 8), clt.reconstruct(rows, 8))


@pytest.mark.parametrize("argv,message", [
    (["--arch", "transcoder", "--hookpoints", "resid_post.0"], "reads an MLP's input and output"),
    (["--arch", "clt", "--hookpoints", "mlp.0"], "several layers' MLP inputs"),
    (["--arch", "transcoder", "--layers", "0", "--hookpoints", "mlp.0"], "not both"),
    (["--arch", "clt", "--layers", "1", "0"], "later layer"),
])
def test_bad_transcoder_requests_are_one_line_and_exit_2(lm_dir, tmp_path, capsys, argv, message):
    from ksae_jax import cli
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sae_run.main(["--model", str(lm_dir), "--out", str(tmp_path / "x")]
                                     + argv + RUN), "ksae train")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_cache_of_mlp_pairs_trains_transcoders_judged_in_the_model(lm_dir, tmp_path):
    """From a cache too: `ksae cache --mlp-pairs` writes [input | output] rows of the MLP, and
    --lm judges the transcoders with that MLP replaced (the cache's meta says where)."""
    from ksae_jax.lm import cache
    cfg = cache.CacheConfig(model=str(lm_dir), layer=1, mlp_pairs=True, tokens=600,
                            heldout_tokens=90, context=16, text=str(ROOT / "README.md"),
                            batch_size=4, shard_tokens=300)
    cache.build(cfg, tmp_path / "c", progress=False)
    rows = np.load(sorted((tmp_path / "c" / "train").glob("*.npy"))[0])
    assert rows.shape[1] == 64  # 2 d
    out = tmp_path / "tc"
    sae_run.main(["--data", str(tmp_path / "c" / "train"), "--eval-data",
                  str(tmp_path / "c" / "heldout"), "--arch", "transcoder", "--latents", "64",
                  "--ks", "2", "8", "--steps", "4", "--batch-size", "100", "--lm", str(lm_dir),
                  "--lm-text", str(ROOT / "README.md"), "--lm-tokens", "60", "--no-progress",
                  "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["lm_hookpoint"] == "mlp.1" and np.isfinite(m["delta_loss"]).all()
    assert ksae_jax.load(out / "params.pkl").model_config.d_in == 32
