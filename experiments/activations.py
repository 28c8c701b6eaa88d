"""Real activations offline: a small image classifier (a ReLU MLP 784-512-512-10, a few CPU
minutes) trained on an MNIST-format dataset, and its last 512-wide hidden layer's activations
of every training and test image written as .npy files an SAE can train on.

    python -m experiments.activations --idx-dir /usr/share/datasets/fashion-mnist --out runs/acts
    ksae train --data runs/acts/train.npy --eval-data runs/acts/test.npy --latents 8192 --ks 8 16 32 64
"""
from pathlib import Path

from ksae_jax import classify, cli, flags, runner
from ksae_jax.data.images import ImageData

GROUPS = [flags.Group("data", (ImageData,)), flags.Group("classifier", (classify.ActivationsConfig,)),
          flags.Group("output", (runner.Output,))]


def main(argv=None) -> dict:
    values = flags.parse(flags.make_parser("python -m experiments.activations",
                                           __doc__.split("\n\n")[0], GROUPS), argv)
    data = flags.build(ImageData, values)
    cfg, output = flags.build(classify.ActivationsConfig, values), flags.build(runner.Output, values)
    ds = data.load()
    out = runner.prepare_out_dir(Path(output.out or "runs/activations"), output.overwrite)
    return classify.write_activations(cfg, ds, out, str(data.idx_dir or ds.name), output.progress)


if __name__ == "__main__":
    cli.run(main, "activations")
