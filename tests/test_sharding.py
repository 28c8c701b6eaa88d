"""Scale-out: sweeps on meshes of forced CPU devices and a two-process jax.distributed run equal
the one-device run (subprocesses: the device count is fixed when JAX starts)."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksae_jax import formats, sae_run, sharding
from ksae_jax.config import SweepConfig, sae_config
from ksae_jax.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative: |a - b| / |b| per parameter array (Frobenius norms)


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_check.py"),
                        str(tmp_path_factory.mktemp("sharded"))], cwd=ROOT, env=_env(4),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_meshes_give_the_one_device_result(report):
    assert report["devices"] == 4
    runs = {k: v for k, v in report.items() if isinstance(v, dict)}
    assert set(runs) == {"images model=2,data=2", "sae model=2,data=2", "sae latent=2,data=2",
                         "clt latent=2,data=2"}
    for name, r in runs.items():
        assert r["params"] < TOL, (name, r)
        assert r["eval_fvu"] < TOL and r["since_fired_equal"], (name, r)


def test_sharded_top_k_and_resume_across_meshes(report):
    assert report["top_k_equal"]
    assert report["resume from model=2,data=2 on one device"] < TOL
    assert report["resume from model=2,data=2 on latent=2,data=2"] < TOL


def test_mesh_flags_are_checked():
    cfg = sae_config(16, (2, 4, 6), latents=60, batch_size=128)
    assert sharding.parse_mesh("data=2,model=4") == {"data": 2, "model": 4}
    for text, match in [("data=2,data=2", "given twice"), ("batch=2", "NAME=SIZE"),
                        ("data=0", "positive integer"), ("data", "NAME=SIZE")]:
        with pytest.raises(ValueError, match=match):
            sharding.parse_mesh(text)
    for axes, match in [({"data": 4}, "has 4 devices; there are 8"),
                        ({"model": 8}, "does not divide the 3 models"),
                        ({"data": 3, "model": 1}, "does not divide the batch size 128"),
                        ({"latent": 8}, "does not divide the 60 latents")]:
        n_devices = 8 if "there are" in match else math.prod(axes.values())
        with pytest.raises(ValueError, match=match):
            sharding.check_axes(axes, n_devices, cfg, shards_latents=True)
    with pytest.raises(ValueError, match="splits SAEs on vectors, not 'conv'"):
        sharding.check_axes({"latent": 2}, 2, SweepConfig(ks=(5,)), shards_latents=False)
    assert sharding.default_axes(8, 8) == {"model": 8} and sharding.default_axes(8, 3) == {"data": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[list, Path]:
    """The flags of the two-process SAE runs, and the same run on one process and device (this
    one)."""
    folder = tmp_path_factory.mktemp("reference")
    syn = synthetic.generate(3000, d=16, n_features=32, mean_active=3, seed=0)
    np.save(folder / "x.npy", syn.x)
    base = ["--data", str(folder / "x.npy"), "--latents", "64", "--ks", "2", "4", "--steps", "6",
            "--batch-size", "128", "--eval-every", "3", "--no-progress"]
    sae_run.main([*base, "--out", str(folder / "ref")], prog="ksae train")
    return base, folder / "ref"


def test_two_processes_train_write_once_and_equal_one_process(reference, tmp_path):
    """Two processes share one run folder: each writes its own shards of the checkpoints,
    process 0 alone the result files; the params equal the one-process run's."""
    base, ref = reference
    shared = tmp_path / "shared"
    procs, outs = _two_processes(base + ["--mesh", "data=4", "--out", str(shared), "--overwrite"],
                                 "-m ksae_jax train")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "mesh: data=4 over 4 cpu devices in 2 processes" in outs[0][0]
    assert {f.name for f in shared.iterdir()} == {"params.pkl", "metrics.json", "checkpoints",
                                                  "fvu_vs_k.png", "firing_freq.png",
                                                  "training_curves.png"}  # written once
    assert sorted(p.name for p in (shared / "checkpoints").iterdir()) == ["3", "6"]
    a = formats.load_params_file(shared / "params.pkl")["params"]
    b = formats.load_params_file(ref / "params.pkl")["params"]
    for name in a:
        assert np.linalg.norm(a[name] - b[name]) <= TOL * np.linalg.norm(b[name]), name
    ma = json.loads((shared / "metrics.json").read_text())
    mb = json.loads((ref / "metrics.json").read_text())
    np.testing.assert_allclose(ma["fvu"], mb["fvu"], rtol=TOL)
    assert ma["processes"] == 2 and ma["mesh"] == {"data": 4}


def _two_processes(args: list[str], script: str, timeout: int = 300):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *script.split(), *args, "--distributed",
                               "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i)], cwd=ROOT, env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    return procs, [p.communicate(timeout=timeout) for p in procs]


def test_checkpoint_of_two_processes_resumes_on_other_meshes_and_one_process(reference, tmp_path):
    """2 processes x 2 devices (latent=2, data=2) train, checkpoint and die; the run resumes
    on one process with latent=4 and on one device (this process), each ending where an
    uninterrupted run ends."""
    base, ref = reference
    cut = tmp_path / "cut"
    procs, outs = _two_processes(base + ["--mesh", "latent=2,data=2", "--out", str(cut),
                                         "--overwrite"], "tests/stopped_run.py ksae_jax train")
    assert [p.returncode for p in procs] == [75, 75], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["3"]
    b = formats.load_params_file(ref / "params.pkl")["params"]

    def on_four_devices(copy):  # latent=4: a process of its own, with 4 devices
        r = subprocess.run([sys.executable, "-m", "ksae_jax", "train", *base, "--mesh",
                            "latent=4", "--resume", str(copy)], cwd=ROOT, env=_env(4),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    def on_one_device(copy):  # this process
        sae_run.main([*base, "--resume", str(copy)], prog="ksae train")

    for name, resume in (("mesh", on_four_devices), ("one", on_one_device)):
        copy = tmp_path / name
        shutil.copytree(cut, copy)
        resume(copy)
        a = formats.load_params_file(copy / "params.pkl")["params"]
        for leaf in a:
            assert np.linalg.norm(a[leaf] - b[leaf]) <= TOL * np.linalg.norm(b[leaf]), (name, leaf)


OVERHEAD_KB = 512 * 1024  # Orbax/TensorStore's write buffers: measured 0.3-0.8 GB, not growing
                          # with the state (shares of 0.5, 1 and 2 GB)


def test_state_is_born_and_checkpointed_in_shards_within_the_memory_bound(tmp_path):
    """2 GB of train state over 2 processes x 4 devices: each process's peak resident memory,
    while the state is initialised and while it is checkpointed, stays within 1.5 x its
    share + what it held before (Python, JAX, data) + OVERHEAD_KB. (Before the state was
    born sharded: 9.1 GB at init and 6.5 GB at a checkpoint, per process.)"""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "tests/rss_check.py", str(port), str(i), str(tmp_path)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        m = json.loads(out.strip().splitlines()[-1])
        share_kb = m["share_bytes"] / 1024
        assert m["state_bytes"] > 1.9e9 and share_kb * 1024 < 0.51 * m["state_bytes"]
        bound = 1.5 * share_kb + m["rss_before_kb"] + OVERHEAD_KB
        assert m["init_peak_kb"] <= bound, m
        assert m["checkpoint_peak_kb"] <= bound, m


def test_plan_compiles_the_step_from_abstract_shapes(tmp_path):
    """ksae plan on a mesh larger than the machine's devices (forced in a child process): the
    per-device memory is the state's share, and the latent split shows its collectives."""
    out = tmp_path / "plan"
    r = subprocess.run([sys.executable, "-m", "ksae_jax", "plan", "--d-in", "64",
                        "--latents", "4096", "--ks", "8", "--batch-size", "256", "--mesh",
                        "latent=4,data=2", "--out", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mesh data=2,latent=4 (8 devices)\n  SAE step, per device: arguments" in r.stdout
    p = json.loads((out / "plan.json").read_text())
    assert p["devices"] == 8 and p["mesh"] == {"data": 2, "latent": 4}
    d = p["per_device"]
    state_bytes = 3 * 2 * 4096 * 64 * 4  # W_enc, W_dec and their two Adam moments, float32
    assert 0.95 * state_bytes / 4 <= d["argument_bytes"] <= 1.1 * state_bytes / 4  # latent / 4
    assert d["flops"] > 2 * 256 / 2 * 64 * 4096 / 4  # at least this device's encoder matmul
    ops = {c["op"] for c in d["collectives"]}
    assert {"all-gather", "all-reduce"} <= ops and all(c["bytes"] > 0 for c in d["collectives"])
    assert sum(c["bytes"] for c in d["collectives"]) < state_bytes  # no gather of the weights


def test_plan_of_a_jax_lm_feeding_saes_at_several_hookpoints(tmp_path):
    """--model plans the LM's forward pass from its config.json alone (weights replicated,
    contexts split over data) beside the step of one SAE per hookpoint."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2)
    config.save_pretrained(tmp_path / "llama")  # config.json only: no weights anywhere
    params = 2 * 512 * 64 + 3 * (2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128) + 64
    out = tmp_path / "plan"
    r = subprocess.run([sys.executable, "-m", "ksae_jax", "plan", "--d-in", "64", "--latents",
                        "1024", "--ks", "8", "--batch-size", "256", "--hookpoints",
                        "resid_post.0", "mlp_out.2", "--mesh", "data=2", "--model",
                        str(tmp_path / "llama"), "--lm-batch", "4", "--context", "32",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LM forward, per device" in r.stdout
    p = json.loads((out / "plan.json").read_text())
    assert p["lm"]["weight_bytes"] == 4 * params and p["lm"]["taps"] == ["resid_post.0", "mlp_out.2"]
    head = 512 * 64  # the output embedding: unused before the last hookpoint, left out
    assert p["lm"]["per_device"]["argument_bytes"] >= 4 * (params - head)  # all on each device
    sae_state = 3 * 2 * 2 * 1024 * 64 * 4  # two SAEs: W_enc, W_dec and two Adam moments
    assert p["per_device"]["argument_bytes"] >= sae_state
