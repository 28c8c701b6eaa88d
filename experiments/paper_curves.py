"""The learning curves of finished paper_table runs in one figure: the feature classifiers'
validation and test error per k against the autoencoders' epochs, one line style per run
(each run's table.json, written with --curve-epochs), the paper's test errors dotted.

    python -m experiments.paper_curves default=runs/pt_default paper=runs/pt_paper \
        --out results/paper_table_mnist/error_vs_epochs.png

Writes the figure and, beside it, a .json of the curves it drew.
"""
import dataclasses
from pathlib import Path
from typing import ClassVar

from ksae_jax import cli, flags, paper_table


@dataclasses.dataclass(frozen=True)
class Curves:
    """Runs to draw, and where."""

    runs: tuple[str, ...]
    """paper_table output folders, each LABEL=RUN (the label defaults to its recipe)."""
    out: Path
    """The figure (.png)."""

    positional: ClassVar[tuple] = ("runs",)


def main(argv=None):
    parser = flags.make_parser("python -m experiments.paper_curves", __doc__.split("\n\n")[0],
                               [flags.Group("curves", (Curves,))])
    c = flags.build(Curves, flags.parse(parser, argv))
    return paper_table.curves(list(c.runs), c.out)


if __name__ == "__main__":
    cli.run(main, "paper_curves")
