"""Makhzani & Frey's result (k-Sparse Autoencoders, ICLR 2014, Table 1), reproduced on their
protocol: k-sparse features against raw pixels under a softmax classifier on MNIST, 10,000
validation images drawn from the training set, every choice made on them, the test set read
once at the end.

    python -m experiments.paper_table --quick          # the trend in a few minutes
    python -m experiments.paper_table --idx-dir DIR --recipe paper --epochs 60 --curve-epochs 5 15 30
    python -m experiments.paper_table --idx-dir /usr/share/datasets/fashion-mnist --finetune

DIR holds the four MNIST IDX files (or give --dataset mnist, read through TFDS with network).
`--help` lists every flag; docs/paper.md the runs and their tables.
"""
from ksae_jax import cli, paper_table

if __name__ == "__main__":
    cli.run(lambda: paper_table.main(), "paper_table")
