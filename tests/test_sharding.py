"""Scale-out: sweeps on meshes of forced CPU devices and a two-process jax.distributed run equal
the one-device run (subprocesses: the device count is fixed when JAX starts)."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ksae_jax import formats, sharding
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
                        str(tmp_path_factory.mktemp("sharded"))], cwd=ROOT, env=_env(8),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_meshes_give_the_one_device_result(report):
    assert report["devices"] == 8
    runs = {k: v for k, v in report.items() if isinstance(v, dict)}
    assert set(runs) == {"images data=8", "images model=4,data=2", "sae data=8",
                         "sae model=4,data=2", "sae latent=4,data=2"}
    for name, r in runs.items():
        assert r["params"] < TOL, (name, r)
        assert r["eval_fvu"] < TOL and r["since_fired_equal"], (name, r)


def test_sharded_top_k_and_resume_across_meshes(report):
    assert report["top_k_equal"]
    assert report["resume from data=8 on one device"] < TOL
    assert report["resume from data=8 on model=2,data=4"] < TOL


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


def test_two_processes_train_write_once_and_equal_one_process(tmp_path):
    syn = synthetic.generate(3000, d=16, n_features=32, mean_active=3, seed=0)
    np.save(tmp_path / "x.npy", syn.x)
    base = [sys.executable, "-m", "experiments.sae", "--data", str(tmp_path / "x.npy"),
            "--latents", "64", "--ks", "2", "4", "--steps", "6", "--batch-size", "128",
            "--eval-every", "3", "--no-progress"]
    ref = subprocess.run(base + ["--out", str(tmp_path / "ref")], cwd=ROOT, env=_env(1),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    port = _free_port()
    procs = [subprocess.Popen(base + ["--mesh", "data=8", "--distributed", "--coordinator",
                                      f"localhost:{port}", "--num-processes", "2", "--process-id",
                                      str(i), "--out", str(tmp_path / f"p{i}")],
                              cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "mesh: data=8 over 8 cpu devices in 2 processes" in outs[0][0]
    written = {f.name for f in (tmp_path / "p0").iterdir()}
    assert {"params.pkl", "metrics.json", "checkpoint.pkl"} <= written
    assert not list((tmp_path / "p1").iterdir())  # process 1 wrote nothing
    a = formats.load_params_file(tmp_path / "p0" / "params.pkl")["params"]
    b = formats.load_params_file(tmp_path / "ref" / "params.pkl")["params"]
    for name in a:
        assert np.linalg.norm(a[name] - b[name]) <= TOL * np.linalg.norm(b[name]), name
    ma = json.loads((tmp_path / "p0" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    np.testing.assert_allclose(ma["fvu"], mb["fvu"], rtol=TOL)
    assert ma["processes"] == 2 and ma["mesh"] == {"data": 8}
