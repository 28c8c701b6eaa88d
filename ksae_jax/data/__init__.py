"""Data: images (TFDS, IDX files, the offline MNIST sample), vectors (.npy files, shards,
arrays), synthetic vectors with known features, and the feeders that batch them."""
