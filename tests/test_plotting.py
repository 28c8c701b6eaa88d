"""The image grids: every image in its tile, gaps blank, labels beside their rows."""
import numpy as np

from ksae_jax import plotting


def _images(n, shape=(3, 2), seed=0):
    return list(np.random.default_rng(seed).random((n, *shape)))


def test_mosaic_puts_every_image_in_its_tile_and_leaves_the_rest_blank():
    (a, b), (c,) = _images(2), _images(1, seed=1)
    tiles, h = plotting._mosaic([[a, b], [c]], "fixed", gap=1)
    assert h == 3 and tiles.shape == (7, 5)
    np.testing.assert_array_equal(tiles[0:3, 0:2], a)
    np.testing.assert_array_equal(tiles[0:3, 3:5], b)
    np.testing.assert_array_equal(tiles[4:7, 0:2], c)
    assert np.isnan(tiles[3]).all() and np.isnan(tiles[:, 2]).all()
    assert np.isnan(tiles[4:7, 3:5]).all()  # the short row's missing image


def test_mosaic_each_stretches_every_image_to_its_own_range():
    ramp, flat = np.arange(6.0).reshape(3, 2) * 5 - 7, np.full((3, 2), 4.0)
    tiles, _ = plotting._mosaic([[ramp, flat]], "each", gap=1)
    np.testing.assert_allclose(tiles[:, 0:2], (ramp - ramp.min()) / np.ptp(ramp))
    np.testing.assert_array_equal(tiles[:, 3:5], 0.0)


def test_image_rows_labels_each_row_and_saves(tmp_path):
    fig = plotting.compare_ks(np.stack(_images(4, (28, 28))),
                              {5: np.stack(_images(4, (28, 28), 2)), 25: np.zeros((4, 28, 28))})
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.texts] == ["input", "k = 5", "k = 25"]
    rows = [t.get_position()[1] for t in ax.texts]
    assert rows == sorted(rows) and len(set(rows)) == 3  # one label per row, top to bottom
    plotting.save(fig, tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
