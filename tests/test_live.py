"""Live training on a running LM (a tiny GPT-2 built from a config): hookpoints by module path
and short name, the context stream, the mixing buffer, the live source against the same rows
from a cache, a killed and resumed live run, what a run writes, and bad input."""
import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the lm extra: .ci/run installs requirements-lm.txt
pytest.importorskip("transformers")

import ksae_jax
from ksae_jax import cli, formats, sae_run, step, train
from ksae_jax.config import sae_config
from ksae_jax.lm import backend, cache, live, offline_lm
from ksae_jax.lm import hookpoints as hooks
from ksae_jax.lm import model as lm_model

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "README.md"  # English prose that ships with the repository


@pytest.fixture
def lm_dir(tiny_lm):
    return tiny_lm[0]  # conftest's GPT-2: 2 blocks, d 32, 16 positions


def live_cfg(lm_dir, **kw) -> live.LiveData:
    return live.LiveData(**{"model": str(lm_dir), "text": str(TEXT), "tokens": 640,
                            "heldout_tokens": 60, "context": 16, "lm_batch": 4,
                            "buffer_tokens": 256, **kw})


RUN = ["--text", str(TEXT), "--latents", "64", "--ks", "4", "8", "--tokens", "1280",
       "--batch-size", "64", "--heldout-tokens", "60", "--context", "16", "--lm-batch", "4",
       "--buffer-tokens", "256", "--lm-tokens", "60", "--no-progress"]


def test_hookpoints_by_path_glob_and_short_name_read_what_torch_computes(lm_dir):
    model, tokenizer = lm_model.load(str(lm_dir))
    names = ["transformer.h.*", "mlp_in.1", "mlp_out.0", "resid_post.0"]
    with pytest.raises(lm_model.LMError, match="repeat"):  # h.0 twice (glob and short name)
        hooks.resolve(model, names)
    found = hooks.resolve(model, names[:3])
    assert [(h.name, h.path, h.side) for h in found] == [
        ("transformer.h.0", "transformer.h.0", "out"), ("transformer.h.1", "transformer.h.1", "out"),
        ("mlp_in.1", "transformer.h.1.mlp", "in"), ("mlp_out.0", "transformer.h.0.mlp", "out")]
    assert hooks.resolve(model, ["h.*"]) == found[:2]  # sparsify's names, as in its --hookpoints
    ids = torch.randint(0, 400, (2, 9))
    got = hooks.capture(model, found, ids)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        block1 = model.transformer.h[1]
        mlp_in = block1.ln_2(states[1] + block1.attn(block1.ln_1(states[1]))[0])
    torch.testing.assert_close(got["transformer.h.0"], states[1], rtol=0, atol=0)  # [2]: ln_f's
    torch.testing.assert_close(got["mlp_in.1"], mlp_in, rtol=1e-6, atol=1e-6)
    assert got["mlp_out.0"].shape == (2, 9, 32)


def test_the_forward_pass_stops_after_the_last_hookpoint(lm_dir):
    model, _ = lm_model.load(str(lm_dir))
    ran = []
    handle = model.transformer.h[1].register_forward_hook(lambda *a: ran.append(1))
    try:
        hooks.capture(model, hooks.resolve(model, ["resid_post.0"]), torch.zeros((1, 4), dtype=int))
        assert ran == []
        hooks.capture(model, hooks.resolve(model, ["resid_post.1"]), torch.zeros((1, 4), dtype=int))
        assert ran == [1]
    finally:
        handle.remove()


def test_unknown_hookpoint_names_the_module_paths(lm_dir):
    model, _ = lm_model.load(str(lm_dir))
    with pytest.raises(lm_model.LMError) as e:
        hooks.resolve(model, ["transformer.q.*"])
    assert "transformer.h.0" in str(e.value) and "resid_post.L" in str(e.value)


def test_contexts_start_with_bos_and_resume_at_any_context(lm_dir):
    _, tokenizer = lm_model.load(str(lm_dir))
    docs = [f"document number {i} says something." for i in range(40)]
    whole = list(itertools.islice(live.contexts(tokenizer, docs, 8, 7, seed=3), 30))
    assert all(c[0] == 7 and len(c) == 8 for c in whole)
    later = list(itertools.islice(live.contexts(tokenizer, docs, 8, 7, seed=3, start=11), 19))
    np.testing.assert_array_equal(np.stack(whole[11:]), np.stack(later))
    in_order = np.concatenate([c[1:] for c in live.contexts(tokenizer, docs[:5], 8, 7, None)])
    stream = offline_lm.token_stream(tokenizer, docs[:5])
    np.testing.assert_array_equal(in_order, stream[:len(in_order)])  # the cache's packing


def test_mixing_buffer_draws_every_row_once_mixes_contexts_and_resumes_from_its_kept_half():
    half, batch = 512, 64
    chunks = [jax.numpy.arange(half * j, half * (j + 1), dtype=jax.numpy.float32)[None, :, None]
              for j in range(6)]

    def run(mixer, cycles):
        drawn = []
        for c in cycles:
            drawn += [np.asarray(mixer.batch(i)).reshape(-1) for i in range(half // batch)]
            if c != cycles[-1]:
                mixer.next_cycle(chunks[c + 2])
        return drawn

    mixer = live.MixingBuffer(seed=5, rows=2 * half, batch_size=batch)
    mixer.start(chunks[0], chunks[1])
    drawn = run(mixer, [0, 1, 2, 3])
    rows = np.concatenate(drawn + [np.asarray(mixer.kept()).reshape(-1)])
    np.testing.assert_array_equal(np.sort(rows), np.arange(5 * half))  # none lost, none twice
    # neighbours in a batch come from rows far apart (without the buffer: the next row)
    assert np.median(np.abs(np.diff(np.stack(drawn), axis=1))) > 100
    again = live.MixingBuffer(seed=5, rows=2 * half, batch_size=batch)
    again.start(chunks[0], chunks[1])
    run(again, [0, 1])
    kept = again.kept()  # what a checkpoint after cycle 1 holds
    resumed = live.MixingBuffer(seed=5, rows=2 * half, batch_size=batch)
    resumed.resume(2, kept, chunks[3])
    for a, b in zip(run(resumed, [2, 3]), drawn[2 * half // batch:]):
        np.testing.assert_array_equal(a, b)


class CacheRows:
    """The rows of an activation cache (one array per hookpoint, in context order) served
    as the live source's forward passes serve them: lm_batch contexts at a time."""

    def __init__(self, lm, windows, arrays):
        self.cfg, self.widths, self.seconds = lm.cfg, lm.widths, 0.0
        self.names = lm.names[-len(arrays):]  # the hookpoints whose rows it serves
        self.train_contexts, self.backend = lm.train_contexts, lm.backend
        self.where = {w.tobytes(): i for i, w in reversed(list(enumerate(windows)))}
        self.arrays, self.per = arrays, windows.shape[1] - 1

    def forward(self, ids):
        at = [self.where[w.tobytes()] * self.per for w in ids]
        rows = [np.concatenate([a[i:i + self.per] for i in at]) for a in self.arrays]
        return jax.numpy.asarray(np.stack(rows))

    def chunk(self, carry, have, ids, size):
        rows = jax.numpy.concatenate([self.forward(one) for one in ids], axis=1)
        return backend.assemble(carry, have, rows, size)


def test_live_source_equals_a_cache_of_the_same_rows_in_the_same_order(lm_dir):
    lm = live.LiveLM(live_cfg(lm_dir, lm_backend="torch"))  # the cache's model, bit for bit
    # the cache: the cache's own residual function on the contexts the live run reads
    windows = np.stack(list(itertools.islice(lm.train_contexts(seed=0), 4 * 14)))
    arrays = [np.concatenate([cache.residuals(lm.backend.model, layer, windows[i:i + 4])[:, 1:]
                              .reshape(-1, 32) for i in range(0, len(windows), 4)])
              for layer in (0, 1)]
    held = [ksae_jax.data.feed.ArrayRows(r) for r in lm.heldout()]
    cfg = sae_config(32, (4, 8), latents=64, batch_size=64, steps=8, eval_every=4,
                     hookpoints=tuple(lm.names))
    compiled = step.sweep_step._cache_size()
    results = [train.prepare(cfg, live.LiveStream(source, 64, 0), held).run(progress=False)
               for source in (lm, CacheRows(lm, windows, arrays))]
    assert step.sweep_step._cache_size() <= compiled + 2  # once for each source's placements
    for a, b in zip(jax.tree.leaves(results[0].params), jax.tree.leaves(results[1].params)):
        np.testing.assert_array_equal(a, b)
    # each hookpoint's models were fed their own rows: alone, they train the same
    alone = train.prepare(sae_config(32, (4, 8), latents=64, batch_size=64, steps=8,
                                     eval_every=4, hookpoints=(lm.names[1],)),
                          live.LiveStream(CacheRows(lm, windows, arrays[1:]), 64, 0), held[1:]).run(
        progress=False)
    for a, b in zip(jax.tree.leaves(results[0].for_hookpoint(1).params),
                    jax.tree.leaves(alone.params)):
        np.testing.assert_array_equal(a, b)


SLOW = ("import sys, time\nfrom ksae_jax import cli, train\nfast = train.sweep_step\n"
        "def slow(*a, **k):\n    time.sleep(0.1)\n    return fast(*a, **k)\n"
        "slow.lower = fast.lower\ntrain.sweep_step = slow\ncli.main(['train', *sys.argv[1:]])\n")


@pytest.mark.parametrize("arch,sweep", [("batchtopk", {"ks": (4, 8)}),
                                        ("matryoshka", {"ks": (4, 8), "prefixes": (16, 32)}),
                                        ("jumprelu", {"l0_coefs": (1e-3, 1e-2)})])
def test_every_family_trains_each_hookpoint_as_its_own_sweep(lm_dir, arch, sweep):
    lm = live.LiveLM(live_cfg(lm_dir, lm_backend="torch"))
    windows = np.stack(list(itertools.islice(lm.train_contexts(seed=0), 4 * 14)))
    arrays = [np.concatenate([cache.residuals(lm.backend.model, layer, windows[i:i + 4])[:, 1:]
                              .reshape(-1, 32) for i in range(0, len(windows), 4)])
              for layer in (0, 1)]
    held = [ksae_jax.data.feed.ArrayRows(r) for r in lm.heldout()]
    ks = sweep.pop("ks", None)

    def run(hookpoints, sources):
        cfg = sae_config(32, ks, arch=arch, latents=64, batch_size=64, steps=4, eval_every=4,
                         hookpoints=hookpoints, **sweep)
        stream = live.LiveStream(CacheRows(lm, windows, sources), 64, 0)
        return train.prepare(cfg, stream, held[-len(sources):]).run(progress=False)

    both, alone = run(tuple(lm.names), arrays), run((lm.names[1],), arrays[1:])
    # the same to float rounding (a larger program may fuse JumpReLU's ops otherwise)
    for a, b in zip(jax.tree.leaves(both.for_hookpoint(1).params), jax.tree.leaves(alone.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(both.for_hookpoint(1).final.fvu, alone.final.fvu, rtol=1e-5)


def ksae(args, slow=False):
    """`python -m ksae_jax train ARGS` (slow: 0.1 s before every step, to be killed midway)."""
    head = ["-c", SLOW] if slow else ["-m", "ksae_jax", "train"]
    return subprocess.Popen([sys.executable, *head, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


def params(folder):
    return jax.tree.leaves(formats.load_params_file(folder / "params.pkl")["params"])


def test_a_live_run_writes_a_folder_per_hookpoint_and_resumes_bit_for_bit(lm_dir, tmp_path,
                                                                          capsys):
    ref, out = tmp_path / "ref", tmp_path / "run"
    sae_run.main(["--model", str(lm_dir), *RUN, "--out", str(ref)], prog="ksae train")
    printed = capsys.readouterr().out  # the reference runs in this process, the rest as processes
    assert "resid_post.1" in printed and "tokens/s" in printed and "mixing buffer 256" in printed
    m = json.loads((ref / "metrics.json").read_text())
    assert set(m["hookpoints"]) == {"resid_post.0", "resid_post.1"}
    for name, h in m["hookpoints"].items():
        assert h["ks"] == [4, 8] and h["l0"] == [4.0, 8.0] and 0 < h["fvu"][1] < h["fvu"][0] < 1
        assert len(h["delta_loss"]) == len(h["kl"]) == len(h["dead_frac_window"]) == 2
        sae = ksae_jax.load(ref / name / "params.pkl")
        assert sae.labels == (4, 8) and sae.config.model.d_in == 32
        ksae_jax.export_saelens(sae, 8, tmp_path / f"export_{name}")
        assert (tmp_path / f"export_{name}" / "cfg.json").is_file()
    assert m["tokens"] == 1280 and m["tokens_per_s"] > 0 and 0 < m["lm_seconds"] < m["seconds"]
    assert not list(tmp_path.rglob("*.npy"))  # no activation cache
    # killed after its first checkpoint, then resumed: the same params, bit for bit
    proc = ksae(["--model", str(lm_dir), *RUN, "--out", str(out)], slow=True)
    while not (out / "checkpoints" / "2" / "commit_success.txt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finish(ksae(["--model", str(lm_dir), *RUN, "--resume", str(out)]))
    for name in m["hookpoints"]:
        for a, b in zip(params(out / name), params(ref / name)):
            np.testing.assert_array_equal(a, b)


def fail(argv, capsys, prog="ksae train", fn=sae_run.main):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: fn(argv, prog=prog), prog)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--hookpoints", "transformer.x"], "available: transformer.h.0, transformer.h.1"),
    (["--model", "/no/such/model"], "/no/such/model: no such model folder"),
    (["--text", "EMPTY"], "holds no text"),
    (["--tokens", "32"], "--tokens 32 is less than one batch (--batch-size 64)"),
    (["--hookpoints", "resid_post.0", "transformer.h.0.mlp.c_fc"], "different widths"),
    (["--context", "40"], "--context 40: the model takes at most 16 positions"),
    (["--data", "x.npy"], "one of the two"),
    (["--steps", "5"], "--steps: not a setting of a live run"),
])
def test_bad_live_input_is_one_line_exit_2_and_writes_nothing(lm_dir, tmp_path, capsys, flags,
                                                              message):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = ["--model", str(lm_dir), *RUN, "--out", str(tmp_path / "o")]
    for i in range(0, len(flags)):
        if flags[i].startswith("--"):
            values = []
            for v in flags[i + 1:]:
                if v.startswith("--"):
                    break
                values.append(str(tmp_path / "empty.txt") if v == "EMPTY" else v)
            if flags[i] in argv:
                at = argv.index(flags[i])
                argv[at + 1:at + 2] = values
            else:
                argv += [flags[i], *values]
    err = fail(argv, capsys)
    assert message in err, err
    assert not (tmp_path / "o").exists()


def test_text_from_jsonl_and_a_datasets_folder(tmp_path):
    from datasets import Dataset

    from ksae_jax.lm import text
    docs = ["The first document.", "A second one, longer than the first.", "Third."]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i})
                                                for i, d in enumerate(docs)) + "\n\n")
    Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert text.documents(tmp_path / "t.jsonl") == docs == text.documents(str(tmp_path / "ds"))
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(text.TextError, match="line 1: not a JSON object with a \"text\" field"):
        text.documents(tmp_path / "bad.jsonl")
    with pytest.raises(text.TextError, match="no such text file"):
        text.documents(tmp_path / "missing.jsonl")
