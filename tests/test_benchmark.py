"""The benchmark's quick mode runs both suites end to end (timings are measured, not tested)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_its_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--suite", "all", "--quick",
                        "--no-torch", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] and res["peak"]["gflops"] > 0 and res["machine"]["cores"] >= 1
    names = [run["name"] for run in res["runs"]]
    assert names[0].startswith("(a)") and any(n.startswith("(d)") for n in names)
    for run in res["runs"]:
        assert run["train_s"] > 0 and run["compile_s"] > 0 and run["peak_rss_mb"] > 0
        assert 0 < run["peak_fraction"] < 1.5 and run["steps"] >= 3
    assert "| (a) ksae_jax conv" in (tmp_path / "results.md").read_text()
    sae = json.loads((tmp_path / "sae.json").read_text())
    (c,) = sae["configs"]
    for run in ("a", "b", "e"):
        r = c["runs"][run]
        assert r["seconds_per_step"] > 0 and r["compile_s"] > 0 and 0 < r["eval_fvu"][0] < 2
    assert len(c["runs"]["b"]["eval_fvu"]) == 4 and c["summary"]["floor_s"] > 0
    assert abs(c["summary"]["fvu_sparse_vs_dense"]) < 0.01  # same training, other arithmetic
    assert "| (a) ksae_jax, k = 8" in (tmp_path / "sae.md").read_text()
