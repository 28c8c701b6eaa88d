"""Property-based tests (hypothesis): top-k and the IDX reader never crash or hang."""
import gzip

import numpy as np
import pytest
from conftest import idx_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_topk import numpy_keep_top_k

from ksae_jax.data import images as data
from ksae_jax.topk import keep_top_k

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def codes_and_k(draw):
    rows = draw(st.integers(1, 6))
    hidden = draw(st.integers(1, 24))
    # few distinct values: many ties; occasionally wide floats
    values = draw(st.one_of(st.sampled_from([[-1.0, 0.0, 1.0], [0.0, 0.5], [2.0]]),
                            st.just(None)))
    if values is None:
        # subnormals excluded: XLA:CPU flushes them to zero, NumPy does not
        z = draw(st.lists(st.floats(-1e6, 1e6, width=32, allow_subnormal=False), min_size=rows * hidden,
                          max_size=rows * hidden))
    else:
        z = draw(st.lists(st.sampled_from(values), min_size=rows * hidden, max_size=rows * hidden))
    k = draw(st.integers(-2, hidden + 2))
    return np.asarray(z, np.float32).reshape(rows, hidden), k


@SETTINGS
@given(codes_and_k())
def test_top_k_is_the_reference_or_a_value_error(case):
    z, k = case
    if 1 <= k <= z.shape[1]:
        out = np.asarray(keep_top_k(z, k))
        np.testing.assert_array_equal(out, numpy_keep_top_k(z, k))
    else:
        with pytest.raises(ValueError, match=f"k={k}"):
            keep_top_k(z, k)


def _valid_file(n=3):
    rng = np.random.default_rng(n)
    return idx_bytes(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))


@SETTINGS
@given(st.binary(max_size=300), st.booleans())
def test_idx_reader_on_random_bytes(tmp_path_factory, raw, compress):
    path = tmp_path_factory.mktemp("idx") / "random.gz"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    try:
        a = data.read_idx(path)
    except data.DataError as e:
        assert str(path) in str(e)
    else:  # only a well-formed header with exactly the data it declares gets here
        assert a.dtype == np.uint8 and a.size == len(raw) - 4 - 4 * raw[3]


@SETTINGS
@given(st.integers(0, len(_valid_file()) - 1), st.booleans(), st.integers(0, 255))
def test_idx_reader_on_truncated_or_corrupted_files(tmp_path_factory, cut, compress, byte):
    good = _valid_file()
    for raw in (good[:cut], good[:cut] + bytes([byte]) + good[cut + 1:]):
        path = tmp_path_factory.mktemp("idx") / "damaged"
        blob = gzip.compress(raw) if compress else raw
        path.write_bytes(blob)
        try:
            a = data.read_idx(path)
        except data.DataError as e:
            assert str(path) in str(e)
        else:
            assert raw[:4] == good[:4] and len(raw) == len(good) and a.shape[0] * 784 == a.size


@SETTINGS
@given(st.integers(1, 2 ** 32 - 1), st.integers(1, 2 ** 32 - 1), st.integers(1, 2 ** 32 - 1))
def test_idx_reader_on_absurd_headers(tmp_path_factory, d0, d1, d2):
    path = tmp_path_factory.mktemp("idx") / "huge"
    path.write_bytes(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (d0, d1, d2))
                     + b"\x00" * 10)
    if d0 * d1 * d2 == 10:
        assert data.read_idx(path).shape == (d0, d1, d2)
    else:
        with pytest.raises(data.DataError, match="header says"):
            data.read_idx(path)
