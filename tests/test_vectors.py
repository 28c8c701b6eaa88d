"""Vector data: sources, checks, held-out split, normalisation, batch order and feeders."""
import io

import jax
import numpy as np
import pytest

from ksae_jax.data import feed, vectors
from ksae_jax.data.images import DataError


@pytest.fixture
def rows():
    return np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32)


def test_npy_file_is_memory_mapped_and_shards_read_in_name_order(tmp_path, rows):
    np.save(tmp_path / "all.npy", rows)
    one = vectors.open_vectors(tmp_path / "all.npy")
    assert isinstance(one.parts[0], np.memmap) and (one.n, one.d) == (500, 6)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, (a, b) in enumerate([(0, 120), (120, 300), (300, 500)]):
        np.save(shards / f"part{i:02d}.npy", rows[a:b].astype(np.float16 if i == 1 else np.float32))
    many = vectors.open_vectors(shards)
    pick = np.array([0, 119, 120, 299, 300, 499])
    np.testing.assert_allclose(many.take(pick), rows[pick], rtol=1e-3)
    np.testing.assert_array_equal(one.take(pick), rows[pick])
    np.testing.assert_array_equal(vectors.open_vectors(rows).all(), rows)


def _write_truncated(path, rows):
    buf = io.BytesIO()
    np.save(buf, rows)
    path.write_bytes(buf.getvalue()[:-100])


@pytest.mark.parametrize("make,match", [
    (lambda p, r: np.save(p, r[:, 0]), r"expected a 2-D array \(N, d\), got shape \(500,\)"),
    (lambda p, r: np.save(p, (r * 100).astype(np.int32)), "expected float vectors, got dtype int32"),
    (lambda p, r: np.save(p, r[:0]), "empty array of shape"),
    (_write_truncated, "not a readable .npy file"),
    (lambda p, r: p.write_bytes(b"garbage"), "not a readable .npy file"),
])
def test_bad_data_is_refused_naming_the_file(tmp_path, rows, make, match):
    path = tmp_path / "bad.npy"
    make(path, rows)
    with pytest.raises(DataError, match=match) as e:
        vectors.open_vectors(path)
    assert "bad.npy" in str(e.value)


def test_shards_of_different_width_and_missing_paths(tmp_path, rows):
    np.save(tmp_path / "a.npy", rows)
    np.save(tmp_path / "b.npy", rows[:, :5])
    with pytest.raises(DataError, match="b.npy: rows of width 5, but the first shard has d = 6"):
        vectors.open_vectors(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        vectors.open_vectors(tmp_path / "nope.npy")


def test_nonfinite_rows_are_named_or_skipped(tmp_path, rows):
    bad = rows.copy()
    bad[7, 2], bad[300, 0], bad[301, 5] = np.nan, np.inf, -np.inf
    np.save(tmp_path / "x.npy", bad)
    with pytest.raises(DataError, match=r"x.npy row 7: 3 row\(s\) hold NaN or Inf"):
        vectors.open_vectors(tmp_path / "x.npy")
    notes = []
    src = vectors.open_vectors(tmp_path / "x.npy", skip_nonfinite=True, log=notes.append)
    assert src.n == 497 and "dropped 3 row(s)" in notes[0]
    np.testing.assert_array_equal(src.all(), np.delete(rows, [7, 300, 301], axis=0))
    view = src.view(290, 310)
    np.testing.assert_array_equal(view.all(), np.delete(rows, [7, 300, 301], axis=0)[290:310])


def test_held_out_split_and_normalisation(rows):
    src = vectors.open_vectors(rows * 3)
    split = vectors.split(src, eval_frac=0.1)
    assert (split.train.n, split.eval.n) == (450, 50)
    np.testing.assert_array_equal(split.eval.all(), rows[450:] * 3)
    scale = vectors.normalizing_scale(split.train)
    x = split.train.all() * scale
    np.testing.assert_allclose(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)), 6, rtol=1e-5)
    with pytest.raises(DataError, match="every training row is zero"):
        vectors.normalizing_scale(vectors.open_vectors(np.zeros((4, 3), np.float32)))
    with pytest.raises(DataError, match="no held-out set"):
        vectors.split(vectors.open_vectors(rows[:3]), eval_frac=0.05)
    big = vectors.open_vectors(np.arange(2_000_000, dtype=np.float32)[:, None])
    assert vectors.split(big).eval.n == vectors.MAX_EVAL_ROWS


def test_epoch_order_is_a_deterministic_chunked_permutation():
    for chunk, buffer in ((1, None), (16, 64), (10, 35)):
        a = feed.EpochOrder(1003, seed=4, epoch=2, chunk_rows=chunk, buffer_rows=buffer)
        full = a.rows(0, 1003)
        np.testing.assert_array_equal(np.sort(full), np.arange(1003))
        np.testing.assert_array_equal(full, feed.EpochOrder(1003, 4, 2, chunk, buffer).rows(0, 1003))
        assert not np.array_equal(full, feed.EpochOrder(1003, 4, 3, chunk, buffer).rows(0, 1003))
        np.testing.assert_array_equal(np.concatenate([a.rows(0, 77), a.rows(77, 500), a.rows(500, 1003)]),
                                      full)  # any piece, in any order of asking
    chunked = feed.EpochOrder(1000, 0, 0, chunk_rows=100, buffer_rows=200).rows(0, 1000)
    for buf in range(5):  # a buffer holds two whole chunks, shuffled together
        chunks = np.unique(chunked[200 * buf:200 * (buf + 1)] // 100)
        assert len(chunks) == 2


def test_memmap_and_in_memory_batches_are_equal(tmp_path, rows):
    np.save(tmp_path / "x.npy", rows)
    mapped, memory = vectors.open_vectors(tmp_path / "x.npy"), vectors.open_vectors(rows)
    hosts = [feed.HostFeeder(s, 64, seed=3, chunk_rows=16, buffer_rows=128).batches(5)
             for s in (mapped, memory)]
    device = feed.DeviceFeeder(memory, 64, seed=3).batches(5)
    host_unchunked = feed.HostFeeder(mapped, 64, seed=3, chunk_rows=1, buffer_rows=None).batches(5)
    for _ in range(12):  # across an epoch boundary (8 batches per epoch, the last padded)
        a, b = next(hosts[0]), next(hosts[1])
        np.testing.assert_array_equal(a["x"], b["x"])
        np.testing.assert_array_equal(a["w"], b["w"])
        c, d = next(device), next(host_unchunked)
        np.testing.assert_array_equal(c["x"], d["x"])
        np.testing.assert_array_equal(c["w"], d["w"])
    for it in hosts + [host_unchunked]:
        it.close()


def test_host_feeder_pads_the_last_batch_and_reports_errors(rows):
    src = vectors.open_vectors(rows)
    batches = feed.HostFeeder(src, 64, seed=0).batches(7)  # step 7: the epoch's last batch
    last = next(batches)
    assert last["w"].sum() == 500 - 7 * 64 and (np.asarray(last["x"])[last["w"] == 0] == 0).all()
    batches.close()

    class Broken(vectors.VectorSource):
        def take(self, r):
            raise OSError("disk gone")

    broken = Broken([rows], ["array"])
    with pytest.raises(OSError, match="disk gone"):
        next(feed.HostFeeder(broken, 64, seed=0).batches())


def test_feeder_choice_follows_the_device_memory(rows):
    src = vectors.open_vectors(rows)
    assert feed.fits_on_device(src)
    assert feed.make_feeder(src, 10, 0).mode == "device"
    assert feed.make_feeder(src, 10, 0, mode="host").mode == "host"
    huge = vectors.VectorSource([np.lib.stride_tricks.as_strided(np.zeros(1, np.float32),
                                                                  (10 ** 9, 4), (0, 0))], ["huge"])
    assert not feed.fits_on_device(huge) and feed.make_feeder(huge, 10, 0).mode == "host"
    assert jax.devices()[0].platform == "cpu"


@pytest.mark.parametrize("held", ["zero", "one row", "identical"])
def test_held_out_rows_without_variance_are_refused(tmp_path, rows, held):
    data = {"zero": np.zeros_like(rows), "one row": rows,
            "identical": np.tile(rows[:1], (500, 1))}[held]
    eval_data = rows[:1] if held == "one row" else None
    source = vectors.open_vectors(data)
    with pytest.raises(DataError, match="held-out rows do not vary"):
        vectors.split(source, None if eval_data is None else vectors.open_vectors(eval_data))
    vectors.split(vectors.open_vectors(rows))  # rows that vary are taken
