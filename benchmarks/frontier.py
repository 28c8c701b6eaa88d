"""The FVU-against-L0 frontier of finished runs: one panel per data set, one line per family
(read from each run's metrics.json) and per peer (the sparsify rows of a vs_sparsify
summary.json).

    python -m benchmarks.frontier --panel lm runs/fam/topk runs/fam/batchtopk \\
        runs/fam/matryoshka runs/fam/jumprelu --sparsify results/lm/summary.json \\
        --out docs/frontier.png

Writes the figure and, beside it, a .json of the points it drew.
"""
from __future__ import annotations

import json
from pathlib import Path

from ksae_jax import cli, flags, plotting
from ksae_jax.files import write_json


def parse_args(argv):
    p = flags.Parser(prog="python -m benchmarks.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--panel", nargs="+", action="append", required=True, metavar="NAME RUN",
                   help="a panel's name, then its run folders, each RUN or LABEL=RUN (the label "
                        "defaults to the run's family); repeat for more panels")
    p.add_argument("--sparsify", type=Path, action="append", default=[],
                   help="a vs_sparsify summary.json (its 'data' names the panel); repeatable")
    p.add_argument("--title", default="")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    return p.parse_args(argv)


def _read(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise flags.UsageError(f"{what} {path}: {e}") from None


def run_points(folder: Path) -> tuple[str, tuple[list, list]]:
    """(the run's family, (its models' held-out L0s, FVUs))."""
    m = _read(folder / "metrics.json", "run")
    if "fvu" not in m or "l0" not in m:
        raise flags.UsageError(f"run {folder}: metrics.json has no fvu and l0 (not an SAE run?)")
    return m["config"]["model"]["arch"], (list(m["l0"]), list(m["fvu"]))


def peer_points(summary: Path) -> dict[str, dict[str, tuple[list, list]]]:
    """{panel: {"sparsify": (l0s, fvus)}} from a summary's sparsify rows."""
    rows = _read(summary, "summary")
    out: dict = {}
    for r in rows:
        if r.get("system") == "sparsify":
            l0, fvu = out.setdefault(r["data"], {}).setdefault("sparsify", ([], []))
            l0.append(r["l0"])
            fvu.append(r["fvu"])
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    panels = {}
    for name, *runs in args.panel:
        if not runs:
            raise flags.UsageError(f"--panel {name}: give its run folders after the name")
        panels[name] = {}
        for r in runs:
            label, _, folder = r.rpartition("=")
            family, points = run_points(Path(folder))
            panels[name][label or family] = points
    for summary in args.sparsify:
        for name, series in peer_points(summary).items():
            if name in panels:
                panels[name].update(series)
    plotting.save(plotting.frontier(panels, args.title), args.out)
    write_json(args.out.with_suffix(".json"), panels)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return panels


if __name__ == "__main__":
    cli.run(main, "frontier")
