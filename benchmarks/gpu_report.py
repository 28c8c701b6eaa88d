"""gpu.json and gpu.md from the stages benchmarks/gpu.sh ran into one folder.

    python benchmarks/gpu_report.py OUT [--dry-run]

gpu.json always holds the same keys: dry_run, stages (name -> rc, seconds), tests (the pytest
summary line), images, sae, largest, live (each suite's JSON, null where its stage failed) and
targets (the GPU targets: the conv sweep against the PyTorch loop, the SAE against sparsify;
null where unmeasured).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SUITES = {"images": "images/images.json", "sae": "sae/sae.json", "largest": "largest/largest.json",
          "live": "live/live.json"}
MARKDOWN = {"images": "images/images.md", "sae": "sae/sae.md", "largest": "largest/largest.md"}


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def targets(images, sae) -> dict:
    """conv sweep / PyTorch loop (target <= 0.25) and SAE vectors/s over sparsify (>= 1.5)."""
    ratios = (images or {}).get("ratios", {})
    conv = ratios.get("a/c (one-run sweep / PyTorch loop)")
    speed = [c["summary"].get("vectors_per_s_over_sparsify") for c in (sae or {}).get("configs", [])]
    return {"conv_sweep_over_torch_loop": conv, "conv_target": 0.25,
            "sae_vectors_per_s_over_sparsify": speed or None, "sae_target": 1.5}


def main(argv):
    out, dry = Path(argv[0]), "--dry-run" in argv
    stages = {}
    for line in (out / "stages.jsonl").read_text().splitlines():
        s = json.loads(line)
        stages[s["stage"]] = {"rc": s["rc"], "seconds": s["seconds"]}
    tests = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").is_file() else []
    report = {"dry_run": dry, "stages": stages, "tests": tests[-1] if tests else None,
              **{name: _load(out / rel) for name, rel in SUITES.items()}}
    report["targets"] = targets(report["images"], report["sae"])
    (out / "gpu.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    lines = [f"# ksae_jax GPU benchmark{' (CPU dry run, tiny shapes)' if dry else ''}", "",
             "| stage | exit | seconds |", "|---|---:|---:|",
             *(f"| {n} | {s['rc']} | {s['seconds']} |" for n, s in stages.items()), "",
             f"Tests: {report['tests']}", "", "Targets: " + json.dumps(report["targets"]), ""]
    for name, rel in MARKDOWN.items():
        if (out / rel).is_file():
            lines += [(out / rel).read_text(), ""]
    (out / "gpu.md").write_text("\n".join(lines))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return 0 if all(s["rc"] == 0 for s in stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
