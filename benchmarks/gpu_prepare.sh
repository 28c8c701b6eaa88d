#!/usr/bin/env bash
# Fills benchmarks/carry/ (ignored by git; copied to a GPU machine without network):
# the eai-sparsify wheel and the pure-Python packages its coder imports, for the machine's
# python 3.12, and the Fashion-MNIST IDX files. About 55 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=benchmarks/carry
mkdir -p $CARRY/wheels $CARRY/fashion
pip download -q --only-binary=:all: --python-version 3.12 --no-deps -d $CARRY/wheels \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  eai-sparsify accelerate einops natsort simple-parsing docstring-parser safetensors \
  huggingface-hub hf-xet transformers tokenizers regex psutil pyyaml filelock tqdm packaging
FASHION=/usr/share/datasets/fashion-mnist
if [[ ! -d $FASHION ]]; then apt-get install -y -q dataset-fashion-mnist > /dev/null; fi
cp $FASHION/*-ubyte.gz $CARRY/fashion/
du -sh $CARRY
