"""Data: the IDX reader and its error cases, the offline sample, the TFDS path (mocked)."""
import gzip

import numpy as np
import pytest
from conftest import idx_bytes, write_idx_dir

from ksae_jax.data import images as data


def test_idx_dir_round_trip(idx_dir):
    path, arrays = idx_dir
    ds = data.load_idx_dir(path)
    np.testing.assert_array_equal(ds.x_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert data.load(idx_dir=path, train_limit=50).x_train.shape == (50, 28, 28)


def test_uncompressed_idx_files(tmp_path):
    arrays = write_idx_dir(tmp_path, compress=False)
    np.testing.assert_array_equal(data.load_idx_dir(tmp_path).x_test, arrays["t10k-images-idx3-ubyte"])


@pytest.mark.parametrize("mutate,match", [
    (lambda raw: b"\x08\x03" + raw[2:], "wrong magic number"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "type code 0x0d"),
    (lambda raw: raw[:-100], "truncated"),
    (lambda raw: raw + b"\x00", "trailing bytes"),
    (lambda raw: raw[:6], "truncated IDX header"),
    (lambda raw: raw[:3], "too short"),
])
def test_bad_idx_files_name_the_file(tmp_path, mutate, match):
    path = tmp_path / "bad-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(mutate(idx_bytes(np.zeros((5, 28, 28), np.uint8)))))
    with pytest.raises(data.DataError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_truncated_gzip_and_missing_file(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))[:-30])
    with pytest.raises(data.DataError, match="x.gz: corrupt or truncated gzip"):
        data.read_idx(path)
    with pytest.raises(data.DataError, match="nope.gz: file not found"):
        data.read_idx(tmp_path / "nope.gz")


def test_inconsistent_counts_and_missing_files(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(39, np.uint8))))
    with pytest.raises(data.DataError, match="40 images but .*t10k-labels.* 39 labels"):
        data.load_idx_dir(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte.gz: file not found"):
        data.load_idx_dir(tmp_path)
    with pytest.raises(data.DataError, match="no such directory"):
        data.load_idx_dir(tmp_path / "nowhere")


def test_wrong_image_shape(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros((40, 32, 32), np.uint8))))
    with pytest.raises(data.DataError, match=r"t10k-images.*\(N, 28, 28\)"):
        data.load_idx_dir(tmp_path)


def test_mnist_sample_is_real_balanced_and_deterministic(digits):
    assert digits.x_train.shape == (4000, 28, 28) and digits.x_test.shape == (1000, 28, 28)
    np.testing.assert_array_equal(np.bincount(digits.y_test), 100)
    assert 0.1 < (digits.x_train > 0).mean() < 0.3  # digits: mostly black background
    again = data.load_mnist_sample()
    np.testing.assert_array_equal(again.x_train, digits.x_train)


def test_tfds_path_with_mock_data(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds
    monkeypatch.setattr(data, "network_reachable", lambda *a, **k: True)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with tfds.testing.mock_data(num_examples=23):
        ds = data.load_tfds("fashion_mnist", data_dir=str(tmp_path))
    assert ds.name == "fashion_mnist"
    assert ds.x_train.shape == (23, 28, 28) and ds.x_train.dtype == np.uint8
    assert ds.y_test.shape == (23,) and ds.y_test.dtype == np.int64


def test_tfds_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "network_reachable", lambda *a, **k: False)
    with pytest.raises(data.DatasetUnavailable, match="unreachable"):
        data.load_tfds("mnist", data_dir=str(tmp_path))
