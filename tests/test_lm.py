"""The language-model workload on a tiny GPT-2 built from a config: training it, the activation
cache (shards, meta.json, the token budget, resume and refusal), the spliced evaluation
against direct torch computations, the SAE experiment with --lm, and bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the lm extra: .ci/run installs requirements-lm.txt
pytest.importorskip("transformers")

from ksae_jax import cli, sae_run
from ksae_jax.lm import cache, offline_lm, splice, text
from ksae_jax.lm import hookpoints as hooks
from ksae_jax.lm import model as lm_model

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "README.md"  # English prose that ships with the repository


def small_cache(lm_dir, **kw) -> cache.CacheConfig:
    return cache.CacheConfig(**{"model": str(lm_dir), "layer": 0, "tokens": 300, "heldout_tokens": 45,
                                "context": 16, "text": str(TEXT), "batch_size": 4,
                                "shard_tokens": 100, **kw})


def test_offline_lm_is_saved_as_a_hugging_face_folder(tiny_lm):
    out, summary = tiny_lm
    model, tokenizer = lm_model.load(str(out))
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    assert len(tokenizer) <= 400 and lm_model.bos_id(tokenizer) == tokenizer.eos_token_id
    h = summary["heldout"]
    assert 0 < h["loss"] < 10
    assert 0 < h["bits_per_byte"] < h["loss"] / np.log(2)  # every token stands for >= 1 byte
    assert json.loads((out / "train_lm.json").read_text())["config"]["layers"] == 2


def test_cache_writes_the_budget_in_shards_with_meta(tiny_lm, tmp_path):
    lm_dir, _ = tiny_lm
    meta = cache.build(small_cache(lm_dir), tmp_path / "c", progress=False)
    train = [np.load(f) for f in sorted((tmp_path / "c" / "train").glob("*.npy"))]
    held = [np.load(f) for f in sorted((tmp_path / "c" / "heldout").glob("*.npy"))]
    assert sum(len(a) for a in train) == 300 and sum(len(a) for a in held) == 45
    assert len(train) == 4 and all(a.shape[1] == 32 and a.dtype == np.float32 for a in train)
    assert (meta["d"], meta["layer"], meta["context"], meta["train_tokens"]) == (32, 0, 16, 300)
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["model"] == str(lm_dir)
    assert not (tmp_path / "c" / cache.PROGRESS).exists()
    # the rows are the block's output at every position but BOS, as output_hidden_states gives
    model, tokenizer = lm_model.load(str(lm_dir))
    cfg = small_cache(lm_dir)
    stream = cache._streams(cfg, tokenizer)[1]
    ids = offline_lm.windows(stream, np.arange(2) * 15, 16, lm_model.bos_id(tokenizer))
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids).long(), output_hidden_states=True).hidden_states[1]
    np.testing.assert_allclose(np.concatenate(held)[:30], hidden[:, 1:].reshape(30, 32).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_interrupted_cache_resumes_and_other_settings_are_refused(tiny_lm, tmp_path, monkeypatch):
    lm_dir, _ = tiny_lm
    whole = tmp_path / "whole"
    cache.build(small_cache(lm_dir), whole, progress=False)
    real, calls = cache._save_npy, []

    def die_after_two(path, array):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(path)
        real(path, array)

    monkeypatch.setattr(cache, "_save_npy", die_after_two)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        cache.build(small_cache(lm_dir), cut, progress=False)
    monkeypatch.setattr(cache, "_save_npy", real)
    assert not (cut / "meta.json").exists() and len(list((cut / "train").glob("*.npy"))) == 2
    with pytest.raises(cache.CacheError, match="other settings \\(tokens\\)"):
        cache.build(small_cache(lm_dir, tokens=200), cut, progress=False)
    cache.build(small_cache(lm_dir), cut, progress=False)  # resumes after shard 2
    for a, b in zip(sorted(whole.glob("*/*.npy")), sorted(cut.glob("*/*.npy"))):
        np.testing.assert_array_equal(np.load(a), np.load(b))
    with pytest.raises(cache.CacheError, match="complete cache already"):
        cache.build(small_cache(lm_dir), cut, progress=False)


def _direct_loss(model, ids, layer, fn):
    """Mean next-token loss over targets 2..T-1 with block `layer`'s output at positions 1..
    replaced by fn, computed with a hook of this test's own and F.cross_entropy."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = torch.cat([h[:, :1], fn(h[:, 1:])], dim=1)
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h

    handle = model.transformer.h[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(ids).logits[:, 1:-1]
    finally:
        handle.remove()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   ids[:, 2:].reshape(-1)))


def test_spliced_losses_against_torch_and_the_identity_and_zero_ends(tiny_lm):
    lm_dir, _ = tiny_lm
    model, tokenizer = lm_model.load(str(lm_dir))
    held = text.split(text.documents(str(TEXT)))[1]
    windows = splice.eval_windows(tokenizer, held, 60, 16)
    half = lambda h: 0.5 * h
    losses = splice.spliced_losses(model, hooks.for_layer(model, 1), windows, offline_lm.token_bytes(tokenizer),
                                   {"identity": lambda h: h, "zeros": torch.zeros_like, "half": half})
    ids = torch.from_numpy(windows).long()
    assert losses["clean"]["loss"] == pytest.approx(_direct_loss(model, ids, 1, lambda h: h), rel=1e-5)
    assert losses["half"]["loss"] == pytest.approx(_direct_loss(model, ids, 1, half), rel=1e-5)
    assert losses["zero"]["loss"] == pytest.approx(_direct_loss(model, ids, 1, torch.zeros_like), rel=1e-5)
    assert splice.scores(losses, "identity")["loss_recovered"] == 1.0
    assert splice.scores(losses, "identity")["delta_loss"] == 0.0 == losses["identity"]["kl"]
    assert splice.scores(losses, "zeros")["loss_recovered"] == 0.0
    assert losses["half"]["kl"] > 0 and losses["tokens"] == ids[:, 2:].numel()


def test_sae_on_a_cache_reports_the_lm_metrics(tiny_lm, tmp_path):
    lm_dir, _ = tiny_lm
    cache.build(small_cache(lm_dir, tokens=600, heldout_tokens=90), tmp_path / "c", progress=False)
    out = tmp_path / "sae"
    sae_run.main(["--data", str(tmp_path / "c" / "train"), "--eval-data", str(tmp_path / "c" / "heldout"),
              "--latents", "64", "--ks", "2", "8", "--steps", "4", "--batch-size", "100",
              "--lm", str(lm_dir), "--lm-text", str(TEXT), "--lm-tokens", "60", "--no-progress",
              "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert m["lm_layer"] == 0 and m["lm"] == str(lm_dir)
    for field in ("lm_loss_sae", "delta_loss", "loss_recovered", "kl"):
        assert len(m[field]) == 2 and all(np.isfinite(m[field]))
    sae_loss = np.array(m["lm_loss_sae"])
    np.testing.assert_allclose(sae_loss - m["lm_loss_clean"], m["delta_loss"])
    np.testing.assert_allclose((m["lm_loss_zero"] - sae_loss) / (m["lm_loss_zero"] - m["lm_loss_clean"]),
                               m["loss_recovered"])
    # the separate evaluate command on the saved SAE gives the run's own numbers
    cli.evaluate(["--sae", str(out / "params.pkl"), "--model", str(lm_dir), "--layer", "0",
                  "--text", str(TEXT), "--tokens", "60", "--context", "16",
                  "--out", str(tmp_path / "e.json")], "ksae evaluate")
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["ks"] == [2, 8]
    np.testing.assert_allclose(e["delta_loss"], m["delta_loss"], rtol=1e-5, atol=1e-6)
    # the features in their text: browse finds the cache's contexts and tokenizer
    cli.browse([str(out)], "ksae browse")
    page = (out / "browse" / "k8.html").read_text()
    assert page.count('class="ctx"') >= 5 and page.count("tok fire") >= 5 and "<svg" in page


@pytest.mark.parametrize("flags,message", [
    (["--layer", "7"], "layer 7 does not exist: the model has blocks 0..1"),
    (["--model", "/no/such/model"], "/no/such/model: no such model folder"),
    (["--text", "EMPTY"], "holds no text"),
])
def test_bad_cache_input_is_one_line_exit_2_and_writes_nothing(tiny_lm, tmp_path, capsys, flags,
                                                               message):
    lm_dir, _ = tiny_lm
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = ["--model", str(lm_dir), "--layer", "0", "--tokens", "100", "--context", "16",
            "--text", str(TEXT), "--out", str(tmp_path / "c"), "--no-progress"]
    for flag, value in zip(flags[::2], flags[1::2]):
        argv[argv.index(flag) + 1] = str(tmp_path / "empty.txt") if value == "EMPTY" else value
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: cli.cache(argv, "ksae cache"), "ksae cache")
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "c").exists()


def test_without_the_lm_extra_the_commands_say_what_to_install(tmp_path):
    probe = ("import sys\nsys.modules['torch'] = None\n"  # as if torch were not installed
             "from ksae_jax import cli\ncli.main(['lm', '--out', sys.argv[1]])\n")
    r = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "x")], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "requirements-lm.txt" in r.stderr and r.stderr.count("\n") == 1


def test_contexts_longer_than_the_model_and_layers_of_another_width_are_one_line(
        tiny_lm, tmp_path, capsys):
    lm_dir, _ = tiny_lm  # 16 positions, d = 32
    data = tmp_path / "acts"
    data.mkdir()
    np.save(data / "v.npy", np.random.default_rng(0).normal(size=(400, 16)).astype(np.float32))
    (data / "meta.json").write_text(json.dumps({"layer": 0, "context": 16, "text": str(TEXT)}))
    runs = [
        (cli.cache, ["--model", str(lm_dir), "--layer", "0", "--tokens", "100", "--context", "40",
                     "--text", str(TEXT), "--out", str(tmp_path / "c")], "at most 16 positions"),
        (cli.evaluate, ["--sae", str(tmp_path / "none.pkl"), "--model", str(lm_dir), "--layer",
                        "0", "--text", str(TEXT), "--context", "40"], "at most 16 positions"),
        (sae_run.main, ["--data", str(data / "v.npy"), "--latents", "32", "--ks", "2", "--steps",
                        "2", "--batch-size", "50", "--lm", str(lm_dir), "--out",
                        str(tmp_path / "s"), "--no-progress"], "is 32 wide; the data have d = 16"),
    ]
    for fn, argv, message in runs:
        with pytest.raises(SystemExit) as e:
            cli.run(lambda fn=fn, argv=argv: fn(argv, prog="ksae"), "ksae")
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and (message or "") in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()
