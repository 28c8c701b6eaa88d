"""The GPU script's CPU dry run runs every stage of the benchmark end to end in quick mode and
reports each: gpu.json holds every stage with its keys, and only finite numbers (timings are
measured, never tested)."""
import json
import math
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"tests", "images", "sae", "largest", "live"}


def numbers(tree):
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_gpu_script_dry_run_reports_every_stage_with_finite_numbers(tmp_path):
    r = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    text = (tmp_path / "gpu.json").read_text()
    gpu = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert set(gpu) == {"dry_run", "stages", "tests", "targets"} | STAGES - {"tests"} and gpu["dry_run"]
    assert set(gpu["stages"]) == STAGES
    for stage in gpu["stages"].values():
        assert set(stage) == {"rc", "seconds"} and stage["rc"] == 0 and stage["seconds"] >= 0
    assert "passed" in gpu["tests"] and "failed" not in gpu["tests"]
    assert set(gpu["targets"]) == {"conv_sweep_over_torch_loop", "conv_target",
                                   "sae_vectors_per_s_over_sparsify", "sae_target"}
    assert all(math.isfinite(x) for x in numbers(gpu)) and len(numbers(gpu)) > 100
    assert "# ksae_jax GPU benchmark (CPU dry run" in (tmp_path / "gpu.md").read_text()
    check_suites(gpu, tmp_path)


def check_suites(gpu: dict, out: Path):
    images, sae, largest = gpu["images"], gpu["sae"], gpu["largest"]  # live: below
    assert images["quick"] and set(images["peak"]) == {"gflops", "device", "backend"}
    names = [run["name"] for run in images["runs"]]
    assert names[0].startswith("(a)") and any(n.startswith("(d)") for n in names)
    for run in images["runs"]:
        assert {"train_s", "compile_s", "peak_rss_mb", "peak_fraction", "steps", "gflops",
                "model_images_per_s"} <= set(run) and run["steps"] >= 3
    assert "| (a) ksae_jax conv" in (out / "images" / "images.md").read_text()
    (c,) = sae["configs"]
    for run in ("a", "b", "e", "x", "a_bfloat16", "b_bfloat16"):
        assert {"seconds_per_step", "compile_s", "eval_fvu", "peak_rss_mb", "vectors_per_s"} <= \
            set(c["runs"][run]) and 0 < c["runs"][run]["eval_fvu"][0] < 2
    assert len(c["runs"]["b"]["eval_fvu"]) == 4
    assert abs(c["summary"]["fvu_sparse_vs_dense"]) < 0.01  # same training, other arithmetic
    for run in ("a_bfloat16", "b_bfloat16"):  # bf16 matmuls, f32 accumulation: near f32's FVU
        assert abs(c["runs"][run]["eval_fvu"][0] / c["runs"][run[0]]["eval_fvu"][0] - 1) < 0.05
    if sae["peer"] is not None:
        assert 0 < c["runs"]["c1"]["eval_fvu"] < 2 and "vectors_per_s_over_sparsify" in c["summary"]
    assert "| (a) ksae_jax, k = 8, bfloat16" in (out / "sae" / "sae.md").read_text()
    assert largest["run"]["dtype"] == "bfloat16" and "seconds_per_step" in largest["run"]
    live = gpu["live"]  # SAEs of both blocks and two ks from the running GPT-2, DLPack timed
    assert live["hookpoints"] == 2 and live["tokens"] == 4096
    for backend in ("jax", "torch"):  # the LM in JAX and in torch, the same run otherwise
        assert live[backend]["tokens"] == 4096 and 0 < live[backend]["lm_share"] < 1
    assert live["handoff_seconds"] > 0 and live["torch_device"] == "cpu"


def test_ground_truth_summary_keeps_its_interface_and_the_report_shows_every_row(tmp_path):
    """results/ground_truth/summary.json has the fields scripts read; the report's table has a
    line per row and its figure is written (the comparison itself needs SAELens: not run
    here)."""
    from types import SimpleNamespace

    from benchmarks import ground_truth, ground_truth_report

    summary = json.loads((ROOT / "results" / "ground_truth" / "summary.json").read_text())
    assert {"random_decoder_mcc", "features", "d", "rows"} <= set(summary)
    fields = {"system", "arch", "k", "l0", "steps", "mcc", "f1", "ev", "dead", "uniqueness"}
    for row in summary["rows"]:
        assert fields <= set(row) and row["system"] in ("ksae_jax", "saelens")
        assert 0 <= row["dead"] <= 1 and row["mcc"] > 0 and row["ev"] <= 1
    assert {r["system"] for r in summary["rows"]} == {"ksae_jax", "saelens"}
    assert ground_truth.budget("300x4096") == (300, 4096)
    ground_truth_report.write(SimpleNamespace(out=tmp_path), summary)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert sum(line.startswith("| ksae_jax") or line.startswith("| saelens")
               for line in table) == len(summary["rows"])
    assert (tmp_path / "mcc_ev_l0.png").read_bytes()[:4] == b"\x89PNG"
