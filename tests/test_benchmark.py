"""The GPU script's CPU dry run runs every suite of the benchmark end to end in quick mode
(timings are measured, not tested)."""
import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_dry_run_writes_every_suite(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    gpu = json.loads((tmp_path / "gpu.json").read_text())
    assert gpu["dry_run"] and set(gpu["stages"]) == {"tests", "images", "sae", "largest"}
    assert all(s["rc"] == 0 for s in gpu["stages"].values()) and "passed" in gpu["tests"]
    assert gpu["largest"]["run"]["seconds_per_step"] > 0 and gpu["largest"]["run"]["dtype"] == "bfloat16"
    assert "# ksae_jax GPU benchmark (CPU dry run" in (tmp_path / "gpu.md").read_text()
    check_suites(tmp_path / "images", tmp_path / "sae", gpu["sae"]["peer"] is not None)


def check_suites(images, sae_dir, peer: bool):
    res = json.loads((images / "results.json").read_text())
    assert res["quick"] and res["peak"]["gflops"] > 0 and res["machine"]["cores"] >= 1
    names = [run["name"] for run in res["runs"]]
    assert names[0].startswith("(a)") and any(n.startswith("(d)") for n in names)
    for run in res["runs"]:
        assert run["train_s"] > 0 and run["compile_s"] > 0 and run["peak_rss_mb"] > 0
        assert run["peak_fraction"] > 0 and run["steps"] >= 3  # a ratio of timings: not bounded
    assert "| (a) ksae_jax conv" in (images / "results.md").read_text()
    sae = json.loads((sae_dir / "sae.json").read_text())
    (c,) = sae["configs"]
    for run in ("a", "b", "e"):
        r = c["runs"][run]
        assert r["seconds_per_step"] > 0 and r["compile_s"] > 0 and 0 < r["eval_fvu"][0] < 2
    assert len(c["runs"]["b"]["eval_fvu"]) == 4 and c["summary"]["floor_s"] > 0
    assert abs(c["summary"]["fvu_sparse_vs_dense"]) < 0.01  # same training, other arithmetic
    for run in ("a_bfloat16", "b_bfloat16"):  # bf16 matmuls, f32 accumulation: near f32's FVU
        assert abs(c["runs"][run]["eval_fvu"][0] / c["runs"][run[0]]["eval_fvu"][0] - 1) < 0.05
    if peer:
        assert 0 < c["runs"]["c1"]["eval_fvu"] < 2 and c["summary"]["vectors_per_s_over_sparsify"] > 0
    assert "| (a) ksae_jax, k = 8, bfloat16" in (sae_dir / "sae.md").read_text()
