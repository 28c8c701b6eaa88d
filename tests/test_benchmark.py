"""The benchmark's quick mode runs end to end (timings are measured, not tested)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_its_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--quick", "--no-torch",
                        "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] and res["peak"]["gflops"] > 0 and res["machine"]["cores"] >= 1
    names = [run["name"] for run in res["runs"]]
    assert names[0].startswith("(a)") and any(n.startswith("(d)") for n in names)
    for run in res["runs"]:
        assert run["train_s"] > 0 and run["compile_s"] > 0 and run["peak_rss_mb"] > 0
        assert 0 < run["peak_fraction"] < 1.5 and run["steps"] >= 3
    assert "| (a) ksae_jax conv" in (tmp_path / "results.md").read_text()
