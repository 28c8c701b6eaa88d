"""Learning curves of finished paper_table runs in one figure: the feature classifiers'
validation and test error per k against the autoencoders' epochs, one line style per run
(read from each run's table.json, written with --curve-epochs), the paper's test errors dotted.

    python -m experiments.paper_curves default=runs/pt_default paper=runs/pt_paper \\
        --out results/paper_table_mnist/error_vs_epochs.png

Writes the figure and, beside it, a .json of the curves it drew.
"""
from __future__ import annotations

import json
from pathlib import Path

from experiments.paper_table import paper_by_k
from ksae_jax import cli, plotting
from ksae_jax.files import write_json


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.paper_curves", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN",
                   help="a paper_table output folder, labelled (the label defaults to its recipe)")
    p.add_argument("--out", type=Path, required=True, help="the figure (.png)")
    return p.parse_args(argv)


def read_curve(spec: str) -> tuple[str, str, dict]:
    """(label, dataset, curve) of one LABEL=RUN."""
    label, _, folder = spec.rpartition("=")
    path = Path(folder) / "table.json"
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise cli.UsageError(f"run {folder}: {e}") from None
    curve = table.get("curve")
    if not curve or len(curve["epochs"]) < 2:
        raise cli.UsageError(f"run {folder}: table.json has no learning curve (run paper_table "
                             "with --curve-epochs)")
    return label or table.get("recipe", {}).get("recipe", folder), table["dataset"], curve


def main(argv=None) -> dict:
    args = parse_args(argv)
    read = [read_curve(s) for s in args.runs]
    datasets = {d for _, d, _ in read}
    if len(datasets) > 1:
        raise cli.UsageError(f"the runs are of different data sets: {sorted(datasets)}")
    curves = {label: c for label, _, c in read}
    if len(curves) < len(read):
        raise cli.UsageError("two runs have the same label: give LABEL=RUN")
    dataset = datasets.pop()
    plotting.save(plotting.error_curves(curves, dataset, paper_by_k(dataset)), args.out)
    write_json(args.out.with_suffix(".json"), {"dataset": dataset, "curves": curves})
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return curves


if __name__ == "__main__":
    cli.run(main, prog="paper_curves")
