"""ksae train (SAEs on vectors) end to end on tiny configs: outputs, loading, exports, errors,
resume; and the reproductions built on it (synthetic features, the Fashion activations)."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import latest_checkpoint

import ksae_jax
from ksae_jax import cli, formats, sae_config, sae_run, step, train
from ksae_jax.checkpoint import Checkpoints
from ksae_jax.data import synthetic as synth

ROOT = Path(__file__).resolve().parents[1]


def train_cli(argv):
    """ksae train as the command line runs it: exit codes and one-line errors."""
    cli.run(lambda: sae_run.main(argv), "ksae train")

SAE_OUTPUTS = {"params.pkl", "metrics.json", "checkpoints", "fvu_vs_k.png", "firing_freq.png",
               "training_curves.png"}


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    d = tmp_path_factory.mktemp("acts")
    s = synth.generate(5000, d=24, n_features=40, mean_active=3, seed=2)
    np.save(d / "train.npy", s.x[:4500] * 7 + 3)  # not centred, not unit scale
    np.save(d / "test.npy", s.x[4500:] * 7 + 3)
    return d


TINY = ["--latents", "64", "--ks", "2", "5", "--steps", "12", "--batch-size", "256",
        "--eval-every", "6", "--no-progress"]


def test_tiny_sae_run_writes_every_output_and_loads_back(acts, tmp_path):
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--eval-data", str(acts / "test.npy"),
              "--normalize", "--multi-topk", "--out", str(out)] + TINY)
    assert {p.name for p in out.iterdir()} == SAE_OUTPUTS
    m = json.loads((out / "metrics.json").read_text())
    assert m["ks"] == [2, 5] and m["steps"] == 12 and m["config"]["model"]["multi_topk"]
    for key in ("fvu", "mse", "l0", "dead_frac", "dead_frac_window"):
        assert len(m[key]) == 2
    assert m["l0"][0] <= 2 and m["fvu"][1] < m["fvu"][0] < 1.5
    assert m["input_scale"] != 1.0 and m["history"]["step"] == [6, 12]
    model = ksae_jax.load(out / "params.pkl")
    x = np.load(acts / "test.npy")
    recon = model.reconstruct(x, 5)
    fvu = ((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu == pytest.approx(m["fvu"][1], rel=1e-3)  # the scale is applied inside
    values, idx = model.encode_topk(x[:10], 5)
    dense = model.encode(x[:10], 5)
    assert values.shape == idx.shape == (10, 5)
    np.testing.assert_allclose(np.take_along_axis(dense, idx, 1), values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.decode(dense, 5), model.reconstruct(x[:10], 5), rtol=1e-5)
    assert model.encode(x[0], 2).shape == (1, 64) and model.encode(x[:0], 2).shape == (0, 64)


def test_normalize_is_applied_by_the_library_as_by_the_cli(acts, tmp_path):
    """train_sweep scales the inputs itself (normalize=True), the result carries the scale,
    result.save writes it, and the CLI gives the same params and the same scale."""
    x, held = np.load(acts / "train.npy"), np.load(acts / "test.npy")
    cfg = sae_config(24, (2, 5), latents=64, steps=12, batch_size=256, eval_every=6,
                     normalize=True)
    lib = train.train_sweep(cfg, x, held, progress=False)
    plain = train.train_sweep(sae_config(24, (2, 5), latents=64, steps=12, batch_size=256,
                                         eval_every=6), x, held, progress=False)
    assert lib.input_scale == pytest.approx((24 / np.mean((x.astype(np.float64) ** 2).sum(1))) ** 0.5)
    assert plain.input_scale == 1.0
    assert not np.array_equal(lib.params["W_enc"], plain.params["W_enc"])
    saved = ksae_jax.load(lib.save(tmp_path / "lib"))
    out = tmp_path / "cli"
    sae_run.main(["--data", str(acts / "train.npy"), "--eval-data", str(acts / "test.npy"),
              "--normalize", "--out", str(out)] + TINY)
    by_cli = ksae_jax.load(out / "params.pkl")
    assert saved.input_scale == by_cli.input_scale == lib.input_scale
    for a, b in zip(jax.tree.leaves(saved.params), jax.tree.leaves(by_cli.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(saved.reconstruct(held[:20], 5), by_cli.reconstruct(held[:20], 5))


def test_export_to_sparsify_layout_reconstructs_the_same(acts, tmp_path):
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--normalize", "--out", str(out)] + TINY)
    model = ksae_jax.load(out / "params.pkl")
    exported = ksae_jax.export_sparsify(out / "params.pkl", 5, tmp_path / "sp")
    from safetensors.numpy import load_file
    t = load_file(str(exported / "sae.safetensors"))
    cfg = json.loads((exported / "cfg.json").read_text())
    assert {n: a.shape for n, a in t.items()} == {"encoder.weight": (64, 24), "encoder.bias": (64,),
                                                  "W_dec": (64, 24), "b_dec": (24,)}
    assert all(a.dtype == np.float32 for a in t.values())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"], cfg["activation"]) == (24, 64, 5, "topk")
    x = np.load(acts / "test.npy")[:50]
    # sparsify's forward: top k of ReLU(W (x - b_dec) + b), decoded by rows of W_dec, + b_dec
    pre = np.maximum((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"], 0)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :5]
    recon = np.einsum("bk,bkd->bd", np.take_along_axis(pre, idx, 1), t["W_dec"][idx]) + t["b_dec"]
    np.testing.assert_allclose(recon, model.reconstruct(x, 5), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no model for k=3"):
        ksae_jax.export_sparsify(model, 3, tmp_path / "sp3")


def test_sparsify_loads_the_export(acts, tmp_path):
    """The round trip through sparsify itself, where it is installed (a benchmark peer, not a
    dependency); the layout and its arithmetic are checked above either way."""
    sparsify = pytest.importorskip("sparsify")
    import torch
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--normalize", "--out", str(out)] + TINY)
    model = ksae_jax.load(out / "params.pkl")
    coder = sparsify.SparseCoder.load_from_disk(ksae_jax.export_sparsify(model, 5, tmp_path / "sp"))
    x = np.load(acts / "test.npy")[:50]
    with torch.no_grad():
        enc = coder.encode(torch.from_numpy(x))
        got = coder.decode(enc.top_acts, enc.top_indices).numpy()
    np.testing.assert_allclose(got, model.reconstruct(x, 5), rtol=1e-4, atol=1e-4)


def test_safetensors_export_round_trip(acts, tmp_path, digits):
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--out", str(out)] + TINY)
    model = ksae_jax.load(out / "params.pkl")
    again = ksae_jax.load(ksae_jax.export_safetensors(out / "params.pkl", tmp_path / "st"))
    x = np.load(acts / "test.npy")[:20]
    np.testing.assert_array_equal(again.reconstruct(x, 2), model.reconstruct(x, 2))
    assert again.ks == model.ks and again.input_scale == model.input_scale


def test_interrupted_sae_run_resumes_to_the_same_params(acts, tmp_path, monkeypatch):
    """... and compiles its step once: the restored state is placed as a fresh one is, so
    the resumed run finds the step the uninterrupted run compiled."""
    args = ["--data", str(acts / "train.npy"), "--out"] + TINY
    compiled = step.sweep_step._cache_size()
    sae_run.main(args[:2] + args[2:3] + [str(tmp_path / "ref")] + args[3:])
    assert step.sweep_step._cache_size() <= compiled + 1
    compiled = step.sweep_step._cache_size()
    real = Checkpoints.save

    def save_then_die(self, *args, **kw):
        real(self, *args, **kw)
        self.wait()
        raise KeyboardInterrupt  # as if killed right after the first checkpoint

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    out = tmp_path / "cut"
    with pytest.raises(SystemExit) as e:
        train_cli(args[:3] + [str(out)] + args[3:])
    assert e.value.code == 130 and latest_checkpoint(out)[0] == 6
    monkeypatch.setattr(Checkpoints, "save", real)
    sae_run.main(["--data", str(acts / "train.npy"), "--resume", str(out)] + TINY)
    assert step.sweep_step._cache_size() == compiled
    a = formats.load_params_file(out / "params.pkl")["params"]
    b = formats.load_params_file(tmp_path / "ref" / "params.pkl")["params"]
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("make,message", [
    (lambda p: np.save(p, np.zeros((10, 3, 2), np.float32)), "expected a 2-D array"),
    (lambda p: np.save(p, np.zeros((10, 3), np.int64)), "expected float vectors, got dtype int64"),
    (lambda p: np.save(p, np.zeros((0, 3), np.float32)), "empty array"),
    (lambda p: np.save(p, np.full((10, 3), np.nan, np.float32)), "row 0: 10 row(s) hold NaN or Inf"),
    (lambda p: p.write_bytes(b"\x93NUMPY truncated"), "not a readable .npy file"),
])
def test_bad_data_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, make, message):
    data = tmp_path / "bad.npy"
    make(data)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_cli(["--data", str(data), "--out", str(out)] + TINY)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "bad.npy" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_skip_nonfinite_drops_rows(acts, tmp_path, capsys):
    x = np.load(acts / "train.npy")
    x[[3, 50]] = np.inf
    np.save(tmp_path / "x.npy", x)
    sae_run.main(["--data", str(tmp_path / "x.npy"), "--skip-nonfinite", "--out", str(tmp_path / "o")] + TINY)
    assert "dropped 2 row(s) holding NaN or Inf" in capsys.readouterr().out
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n_train"] + m["n_eval"] == len(x) - 2


def test_synthetic_and_activations_reproductions_run(tmp_path):
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, "-m", "experiments.synthetic", "--rows", "3000",
                        "--eval-rows", "500", "--d", "16", "--features", "24", "--mean-active", "2",
                        "--latents", "48", "--ks", "2", "4", "--steps", "8", "--batch-size", "256",
                        "--no-progress", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["mmcs"]) == len(m["recovered_frac"]) == len(m["dead_frac"]) == 2
    assert 0 < m["mmcs"][0] <= 1 and (out / "mmcs_vs_k.png").exists()
    assert m["config"]["model"]["aux_coef"] == 1.0  # the protocol's AuxK, not ksae train's
    acts_out = tmp_path / "acts"
    r = subprocess.run([sys.executable, "-m", "experiments.activations", "--dataset", "mnist-sample",
                        "--train-limit", "600", "--width", "32", "--epochs", "1", "--no-progress",
                        "--out", str(acts_out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    tr, te = np.load(acts_out / "train.npy"), np.load(acts_out / "test.npy")
    assert tr.shape == (600, 32) and te.shape == (1000, 32) and tr.dtype == np.float32
    assert (tr >= 0).all() and json.loads((acts_out / "info.json").read_text())["test_error_pct"] < 90


def test_frontier_draws_every_family_and_the_peer(tmp_path, capsys):
    from benchmarks import frontier
    runs = []
    for arch, fvu in (("topk", [0.3, 0.2]), ("jumprelu", [0.35, 0.25])):
        run = tmp_path / arch
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps(
            {"fvu": fvu, "l0": [8.0, 16.0], "config": {"model": {"arch": arch}}}))
        runs.append(str(run))
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps([{"system": "sparsify", "data": "lm", "k": 8, "l0": 8.0,
                                    "fvu": 0.31}, {"system": "ksae_jax", "data": "lm", "k": 8,
                                                   "l0": 8.0, "fvu": 0.3}]))
    panels = frontier.main(["--panel", "lm", *runs, "--sparsify", str(summary),
                            "--out", str(tmp_path / "f.png")])
    assert panels == {"lm": {"topk": ([8.0, 16.0], [0.3, 0.2]), "jumprelu": ([8.0, 16.0], [0.35, 0.25]),
                             "sparsify": ([8.0], [0.31])}}
    assert (tmp_path / "f.png").stat().st_size > 1000 and (tmp_path / "f.json").is_file()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: frontier.main(["--panel", "lm", str(tmp_path), "--out", str(tmp_path / "g.png")]),
                "frontier")
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("flags,message", [
    (["--init-mix", "2"], "--init-mix: only init_dirs 'mixed'"),
    (["--b-enc-init", "zero", "--b-enc-mean-keep", "0.25"], "--b-enc-mean-keep: only"),
    (["--b-enc-mean-keep", "1.5"], "--b-enc-mean-keep must lie in [0, 1]"),
    (["--arch", "jumprelu", "--b-enc-mean-keep", "0.25"], "--b-enc-mean-keep: only"),
    (["--resample-every", "-1"], "--resample-every must be an integer >= 0"),
    (["--k-start", "8", "--k-anneal-frac", "0"], "--k-start schedules k"),
    (["--k-start", "999"], "k_start=999 is larger than the code's 64 units"),
    (["--arch", "batchtopk", "--multi-topk"], "--multi-topk: a setting of topk models, not batchtopk"),
    (["--arch", "topk", "--l0-coefs", "0.1"], "--l0-coefs are JumpReLU's"),
    (["--arch", "jumprelu", "--init-l0", "0"], "--init-l0 must be positive"),
])
def test_bad_recipe_flags_exit_2_with_one_line(acts, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_cli(["--data", str(acts / "train.npy"), "--out", str(out)] + TINY + flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err and not out.exists()


def test_recipe_flags_reach_the_config(acts, tmp_path):
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--out", str(out), "--init-dirs", "mixed",
                  "--init-mix", "0.5", "--resample-every", "3", "--k-start", "10",
                  "--k-anneal-frac", "0.5", "--b-enc-init", "balanced", "--b-enc-mean-keep", "0.25",
                  "--adam-eps", "1e-8", "--aux-coef", "0.5"] + TINY)
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    model, optim = cfg["model"], cfg["optim"]
    assert (model["init_dirs"], model["init_mix"]) == ("mixed", 0.5)
    assert (model["b_enc_init"], model["b_enc_mean_keep"]) == ("balanced", 0.25)
    assert (model["resample_every"], optim["k_start"], optim["k_anneal_frac"]) == (3, 10, 0.5)
    assert (model["latents"], model["aux_coef"], optim["adam_eps"]) == (64, 0.5, 1e-8)


def test_metrics_go_to_tensorboard_and_to_wandb_offline(acts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    sae_run.main(["--data", str(acts / "train.npy"), "--eval-data", str(acts / "test.npy"),
                  "--out", str(out), "--tensorboard", "--wandb"] + TINY)
    scalars = tensorboard_scalars(next((out / "tensorboard").glob("events.out.tfevents.*")))
    m = json.loads((out / "metrics.json").read_text())
    fvu = scalars["eval/fvu/5"]
    assert [step for step, _ in fvu] == m["history"]["step"] == [6, 12]
    np.testing.assert_allclose([v for _, v in fvu], m["history"]["eval_fvu"][1],  # k = 5
                               rtol=1e-6)
    assert {"train/loss/2", "train/dead_frac_window/5", "eval/l0/2"} <= set(scalars)
    runs = list((out / "wandb").glob("offline-run-*"))
    log = next(runs[0].glob("*.wandb")).read_bytes()  # the run's offline log, synced later
    assert len(runs) == 1 and log.count(b"eval/fvu/5") >= 2
    for value in m["history"]["eval_fvu"][1]:  # each evaluation's value, as W&B writes it
        assert json.dumps(value).encode() in log


def tensorboard_scalars(path) -> dict:
    """{tag: [(step, value)]} of a TensorBoard event file (TFRecord frames of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, pos, found = path.read_bytes(), 0, {}
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 8], "little")
        event = Event.FromString(data[pos + 12:pos + 12 + n])
        pos += 16 + n
        for v in event.summary.value:
            found.setdefault(v.tag, []).append((event.step, v.simple_value))
    return found
