"""End-to-end SAE training through the JAX LM: the spliced KL and its gradient, and live runs
with --loss kl / fvu+kl (and the settings they refuse)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from ksae_jax import cli, sae_run  # noqa: E402
from ksae_jax.lm import e2e, jax_lm  # noqa: E402

from test_live import RUN, fail  # noqa: E402


@pytest.fixture
def lm_dir(tiny_lm):
    return tiny_lm[0]


def test_spliced_kl_is_zero_at_the_clean_activations_and_its_gradient_matches_finite_differences(
        tiny_lm):
    folder, _ = tiny_lm
    lm = jax_lm.load(folder)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 400, (3, 10)), jnp.int32)
    with jax.enable_x64(True):
        weights = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), lm.weights)
        kl = e2e.SplicedKL(lm.spec, "mlp_out.0", 0.0, 1.0)
        batch = kl.prepare({"tokens": tokens, "lm": weights})
        clean = batch["x"][0].astype(jnp.float64)
        assert abs(float(kl.kl(clean, batch))) < 1e-12
        recon = clean + 0.3 * jax.random.normal(jax.random.key(1), clean.shape, jnp.float64)
        f = jax.jit(lambda r: kl.kl(r, batch))
        grad = jax.grad(f)(recon)
        assert float(f(recon)) > 1e-4
        for i in range(3):
            v = jax.random.normal(jax.random.key(10 + i), recon.shape, jnp.float64)
            eps = 1e-5
            numeric = (f(recon + eps * v) - f(recon - eps * v)) / (2 * eps)
            np.testing.assert_allclose(float(jnp.vdot(grad, v)), float(numeric), rtol=1e-6)
        assert np.all(np.isfinite(np.asarray(grad)))


E2E = ["--text", RUN[1], "--latents", "64", "--ks", "4", "8", "--tokens", "600",
       "--batch-size", "60", "--heldout-tokens", "60", "--context", "16", "--lm-tokens", "60",
       "--hookpoints", "mlp_out.1", "--no-progress"]


@pytest.mark.parametrize("loss", ["kl", "fvu+kl"])
def test_an_end_to_end_live_run_trains_through_the_lm(lm_dir, tmp_path, loss, capsys):
    extra = ["--kl-coef", "0.5"] if loss == "fvu+kl" else []
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sae_run.main(["--model", str(lm_dir), *E2E, "--loss", loss, *extra,
                                      "--out", str(tmp_path)], prog="ksae train"), "ksae train")
    assert e.value.code == 0
    printed = capsys.readouterr().out
    assert "whole contexts a step" in printed and "inside the compiled step" in printed
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["data"]["objective"] == {"loss": loss, "kl_coef": 0.5 if extra else 1.0}
    h = m["hookpoints"]["mlp_out.1"]
    assert h["l0"] == [4.0, 8.0] and all(np.isfinite(h["fvu"])) and all(np.isfinite(h["kl"]))
    assert m["tokens"] == 600


@pytest.mark.parametrize("flags,message", [
    (["--loss", "kl", "--lm-backend", "torch"], "needs the LM in JAX"),
    (["--loss", "kl", "--hookpoints", "resid_post.0", "resid_post.1"], "one hookpoint at a time"),
    (["--loss", "kl", "--kl-coef", "2"], "--kl-coef: weighs the KL only in --loss fvu+kl"),
    (["--loss", "kl", "--buffer-tokens", "512"], "without a mixing buffer"),
    (["--loss", "kl", "--batch-size", "64"], "not a whole number of contexts of 15"),
])
def test_end_to_end_settings_it_cannot_apply_are_one_line_exit_2(lm_dir, tmp_path, capsys,
                                                                 flags, message):
    argv = ["--model", str(lm_dir), "--text", RUN[1], "--latents", "64", "--ks", "4",
            "--tokens", "1280", "--context", "16", "--hookpoints", "mlp_out.1",
            "--batch-size", "60", "--out", str(tmp_path / "o")]
    for i in range(0, len(flags), 1):
        if flags[i].startswith("--") and flags[i] in argv:
            at = argv.index(flags[i])
            end = at + 1
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
            del argv[at:end]
    err = fail([*argv, *flags], capsys)
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_live_settings_are_refused_on_vectors(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))
    err = fail(["--data", str(tmp_path / "x.npy"), "--loss", "kl"], capsys)
    assert "--loss: a setting of a live run (--model)" in err


def test_an_end_to_end_run_resumes_bit_for_bit(lm_dir, tmp_path):
    """Whole contexts in the text's seeded order: the stream's position follows from the
    step, so a run resumed from its step-2 checkpoint ends with the uninterrupted params."""
    import shutil

    from ksae_jax import train
    from ksae_jax.config import sae_config
    from ksae_jax.data.feed import ArrayRows
    from ksae_jax.lm import live

    from test_live import live_cfg

    lm = live.LiveLM(live_cfg(lm_dir, hookpoints=("mlp_out.1",), lm_backend="jax"))
    held = [ArrayRows(r) for r in lm.heldout()]
    cfg = sae_config(32, (4, 8), latents=64, batch_size=60, steps=4, eval_every=2,
                     hookpoints=("mlp_out.1",))

    def run(folder, resume=False):
        stream = e2e.ContextStream(lm, 60, cfg.seed, e2e.spliced_kl(e2e.Objective("kl"),
                                                                     lm.backend))
        return train.prepare(cfg, stream, held, checkpoint=folder, resume=resume).run(
            progress=False)

    ref = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "4")
    again = run(tmp_path / "b", resume=True)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
