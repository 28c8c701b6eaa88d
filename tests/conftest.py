"""Shared fixtures: small real-format datasets written to temporary folders."""
import gzip
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for the whole run, inherited by the tests' subprocesses: the same
# small programs are compiled by many tests (and every CLI run in a child process); a fresh
# clone starts it empty, so nothing carries over from another checkout.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest


# The files that take longest, longest first: pytest-xdist hands whole files to its workers in
# collection order (pytest.ini: --dist loadfile --no-loadscope-reorder), so the long ones start
# at once and the short ones fill the gaps at the end, instead of one worker finishing a long
# file alone. A file missing here only runs later.
SLOWEST_FILES = ("test_sharding.py", "test_benchmark.py", "test_live.py", "test_resume.py",
                 "test_train.py", "test_sae.py", "test_sae_run.py", "test_paper.py",
                 "test_conv.py", "test_transcoders_live.py", "test_interop.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (unsigned bytes) holding `array`."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_dir(path, n_train=120, n_test=40, seed=0, compress=True):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for stem, a in arrays.items():
        raw = idx_bytes(a)
        if compress:
            (path / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (path / stem).write_bytes(raw)
    return arrays


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    arrays = write_idx_dir(d)
    return d, arrays


@pytest.fixture(scope="session")
def digits():
    """Real MNIST digits (the offline sample), uint8 (N, 28, 28)."""
    from ksae_jax.data import images as data
    return data.load_mnist_sample()



@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(folder, summary) of a GPT-2 of 2 blocks, d 32, 16 positions, trained 4 steps on
    README.md (the lm extra's tests; built once per worker)."""
    pytest.importorskip("torch")
    from ksae_jax.lm import offline_lm

    out = tmp_path_factory.mktemp("lm")
    cfg = offline_lm.LMConfig(layers=2, d_model=32, heads=2, context=16, vocab=400, batch_size=4,
                              steps=4, text=str(Path(__file__).resolve().parents[1] / "README.md"),
                              eval_windows=4)
    return out, offline_lm.train(cfg, out, progress=False)
