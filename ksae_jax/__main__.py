"""python -m ksae_jax: the `ksae` command line."""
from ksae_jax.cli import main

main()
