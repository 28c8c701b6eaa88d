"""The offline language model and its activation cache, under their earlier names:
python -m experiments.lm train|cache|evaluate FLAGS runs ksae lm|cache|evaluate FLAGS."""
import sys

from ksae_jax import cli

if __name__ == "__main__":
    args = sys.argv[1:]
    names = {"train": "lm", "cache": "cache", "evaluate": "evaluate"}
    cli.main([names.get(args[0], args[0]), *args[1:]] if args else [])
