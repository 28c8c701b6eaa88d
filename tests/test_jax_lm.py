"""The JAX forwards against transformers' own: random-weight models of each family built from
small configs, saved with save_pretrained, read back by ksae_jax.lm.jax_lm."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ksae_jax.lm import hookpoints as hooks  # noqa: E402
from ksae_jax.lm import jax_lm  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=16),
    "gpt2_layer_scaled": lambda: transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, n_inner=40,
        scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False),
    "llama_gqa_llama3_rope": lambda: transformers.LlamaConfig(
        **SMALL, num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "llama_tied_linear_rope": lambda: transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2_bias": lambda: transformers.Qwen2Config(**SMALL, num_key_value_heads=2),
    "qwen3_qk_norm": lambda: transformers.Qwen3Config(**SMALL, num_key_value_heads=1,
                                                      head_dim=16),
    "mistral_window": lambda: transformers.MistralConfig(**SMALL, num_key_value_heads=2,
                                                         sliding_window=4),
}
NAMES = ["resid_post.0", "mlp_in.0", "mlp_out.0", "mlp_in.1", "mlp_out.1", "resid_post.1"]
IDS = np.random.default_rng(0).integers(0, 64, (2, 12))


def saved(tmp_path, config, scale=0.05, dtype=None):
    """A random model of the config (weights, biases and norms all perturbed), saved."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    model = model.eval().to(dtype or torch.float32)
    model.save_pretrained(tmp_path)
    return model


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_hookpoints_equal_transformers(tmp_path, name):
    model = saved(tmp_path, CONFIGS[name]())
    logits, acts = jax_lm.load(tmp_path)(IDS, hookpoints=NAMES)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    got = hooks.capture(model, hooks.resolve(model, NAMES), ids)
    assert logits.dtype == np.float32 and logits.shape == (2, 12, 64)
    assert rel(logits, ref) <= 1e-4
    for n in NAMES:
        assert acts[n].shape == (2, 12, 32)
        assert rel(acts[n], got[n].numpy()) <= 1e-4, n


def test_the_sliding_window_is_applied(tmp_path):
    """Mistral's window of 4 changes the logits at positions beyond it, and only there."""
    saved(tmp_path, CONFIGS["mistral_window"]())
    lm = jax_lm.load(tmp_path)
    windowed, _ = lm(IDS)
    lm.spec = jax_lm.dataclasses.replace(lm.spec, window=(0, 0))
    full, _ = lm(IDS)
    np.testing.assert_allclose(windowed[:, :4], full[:, :4], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(windowed[:, 5:]) - np.asarray(full[:, 5:])).max() > 1e-4


@pytest.mark.parametrize("name", ["gpt2", "qwen3_qk_norm"])
def test_bf16_loss_within_a_thousandth_of_a_nat(tmp_path, name):
    model = saved(tmp_path, CONFIGS[name](), dtype=torch.bfloat16)
    lm = jax_lm.load(tmp_path)
    assert {str(a.dtype) for a in jax_lm.jax.tree.leaves(lm.weights)} == {"bfloat16"}
    ids = torch.tensor(IDS)

    def torch_loss(m):
        with torch.no_grad():
            logits = m(ids).logits[:, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]))

    ours = jax_lm.next_token_loss(lm, IDS)
    assert abs(ours - torch_loss(model)) <= 1e-3
    assert abs(ours - torch_loss(model.float())) <= 1e-3


def test_offline_lm_heldout_loss_equals_torch(tiny_lm):
    from ksae_jax.lm import model as lm_model
    from ksae_jax.lm import offline_lm

    folder, _ = tiny_lm
    model, tok = lm_model.load(str(folder))
    tokens = np.random.default_rng(1).integers(0, len(tok), (8, 16)).astype(np.int32)
    torch_loss = offline_lm.heldout_loss(model, tokens, offline_lm.token_bytes(tok))["loss"]
    assert abs(jax_lm.next_token_loss(jax_lm.load(folder), tokens) - torch_loss) <= 1e-4


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    saved(tmp_path, CONFIGS["qwen3_qk_norm"]())
    config = jax_lm.read_config(tmp_path)
    (tmp_path / "config.json").write_text(jax_lm.json.dumps({**config, "intermediate_size": 40}))
    with pytest.raises(jax_lm.WeightsMismatch, match="gate_proj.weight has shape"):
        jax_lm.load(tmp_path)


def test_other_architectures_are_unsupported(tmp_path):
    transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4).save_pretrained(tmp_path)
    with pytest.raises(jax_lm.UnsupportedArchitecture, match="gpt_neox"):
        jax_lm.load(tmp_path)


def test_module_paths_resolve_as_the_torch_path_names_them(tmp_path):
    saved(tmp_path, CONFIGS["gpt2"]())
    lm = jax_lm.load(tmp_path)
    assert lm.resolve(["transformer.h.*", "h.1.mlp", "mlp_in.0"]) == [
        ("transformer.h.0", "resid_post.0"), ("transformer.h.1", "resid_post.1"),
        ("h.1.mlp", "mlp_out.1"), ("mlp_in.0", "mlp_in.0")]
    with pytest.raises(jax_lm.LMError, match="not one the JAX forward gives"):
        lm.resolve(["transformer.h.0.attn"])


def test_both_backends_train_the_same_saes_and_splice_the_same_losses(tiny_lm):
    """The live source run by JAX and by PyTorch: the same rows, SAEs and spliced losses, to
    float rounding. Adam turns a rounding-sized gradient into an lr-sized step, so a latent
    whose gradient is near zero (or a near-tie at the k-th activation) may move apart: a few
    elements may differ, by a few steps of size lr at most."""
    from ksae_jax import train
    from ksae_jax.config import sae_config
    from ksae_jax.data.feed import ArrayRows
    from ksae_jax.lm import live, splice

    folder, _ = tiny_lm
    text = str(jax_lm.Path(__file__).resolve().parents[1] / "README.md")
    results, losses = [], []
    for backend in ("jax", "torch"):
        lm = live.LiveLM(live.LiveData(model=str(folder), text=text, tokens=640,
                                       heldout_tokens=60, context=16, lm_batch=4,
                                       buffer_tokens=256, lm_backend=backend))
        assert lm.backend.kind == backend and lm.names == ["resid_post.0", "resid_post.1"]
        held = [ArrayRows(r) for r in lm.heldout()]
        cfg = sae_config(32, (4, 8), latents=64, batch_size=64, steps=8, eval_every=4,
                         hookpoints=tuple(lm.names))
        results.append(train.prepare(cfg, live.LiveStream(lm, 64, 0), held).run(progress=False))
        windows = splice.eval_windows(lm.tokenizer, lm.held_docs, 60, 16)
        sae = results[-1].for_hookpoint(1).models()
        losses.append(splice.spliced_losses(
            lm.backend.splice, lm.hookpoints[1], windows, offline_lm_bytes(lm.tokenizer),
            {"8": splice.sae_replacement(sae, 8, lm.backend.splice)}))
    for a, b in zip(jax_lm.jax.tree.leaves(results[0].params),
                    jax_lm.jax.tree.leaves(results[1].params)):
        apart = ~np.isclose(a, b, rtol=1e-3, atol=1e-4)
        assert apart.mean() <= 0.02, apart.mean()
        np.testing.assert_allclose(a, b, atol=8 * cfg.optim.lr)  # 8 steps of lr at most
    for name in ("clean", "zero", "8"):
        for field in ("loss", "kl"):
            assert abs(losses[0][name][field] - losses[1][name][field]) <= 1e-4, (name, field)


def offline_lm_bytes(tokenizer):
    from ksae_jax.lm import offline_lm
    return offline_lm.token_bytes(tokenizer)


def neox_folder(tmp_path, tiny_lm):
    """A GPT-NeoX (no JAX forward) with the tiny LM's tokenizer."""
    import shutil
    folder, _ = tiny_lm
    torch.manual_seed(0)
    transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16)).save_pretrained(tmp_path)
    for f in folder.glob("*token*"):
        shutil.copy(f, tmp_path)
    return tmp_path


def test_an_unsupported_architecture_runs_in_pytorch_after_one_line(tmp_path, tiny_lm):
    from ksae_jax.lm import backend
    lines = []
    got = backend.open_backend(str(neox_folder(tmp_path, tiny_lm)), None, "auto", lines.append)
    assert got.kind == "torch" and len(lines) == 1 and "gpt_neox" in lines[0]
    assert [h.name for h in got.hookpoints] == ["resid_post.0", "resid_post.1"]
    with pytest.raises(jax_lm.UnsupportedArchitecture):
        backend.open_backend(str(tmp_path), None, "jax")


def test_a_live_run_on_mismatched_safetensors_is_one_line_exit_2(tmp_path, tiny_lm, capsys):
    import shutil

    from ksae_jax import cli, sae_run
    folder, _ = tiny_lm
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = jax_lm.read_config(bad)
    (bad / "config.json").write_text(jax_lm.json.dumps({**config, "n_embd": 64}))
    readme = str(jax_lm.Path(__file__).resolve().parents[1] / "README.md")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: sae_run.main(["--model", str(bad), "--text", readme, "--latents", "64",
                                      "--ks", "4", "--out", str(tmp_path / "o")],
                                     prog="ksae train"), "ksae train")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "wte.weight has shape" in err, err
    assert not (tmp_path / "o").exists()


def test_the_jax_path_runs_without_torch_installed(tiny_lm, tmp_path):
    """A live run on the JAX LM, tokens to spliced evaluation, with torch unimportable; asked
    for the torch LM, the same run says what to install."""
    import json
    import subprocess
    import sys

    folder, _ = tiny_lm
    root = jax_lm.Path(__file__).resolve().parents[1]
    argv = ["train", "--model", str(folder), "--text", str(root / "README.md"), "--latents",
            "64", "--ks", "4", "--tokens", "640", "--batch-size", "64", "--heldout-tokens", "60",
            "--context", "16", "--lm-batch", "4", "--buffer-tokens", "256", "--lm-tokens", "60",
            "--no-progress", "--out", str(tmp_path / "run")]
    probe = ("import sys\nsys.modules['torch'] = None\nfrom ksae_jax import cli\n"
             "cli.main(sys.argv[1:])\n")

    def run(*extra):
        return subprocess.run([sys.executable, "-c", probe, *argv, *extra], cwd=root,
                              capture_output=True, text=True, timeout=600)

    r = run()
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["lm_backend"] == "jax" and len(m["hookpoints"]["resid_post.1"]["delta_loss"]) == 1
    r = run("--lm-backend", "torch", "--overwrite")
    assert r.returncode == 2 and "requirements-lm.txt" in r.stderr.splitlines()[-1], r.stderr
