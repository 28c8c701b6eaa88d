"""`ksae train` (and, with --plan, `ksae plan`) under its earlier name:
python -m experiments.sae FLAGS runs ksae train FLAGS."""
import sys

from ksae_jax import cli

if __name__ == "__main__":
    args = sys.argv[1:]
    cli.main(["plan", *(a for a in args if a != "--plan")] if "--plan" in args else ["train", *args])
