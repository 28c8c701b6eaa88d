"""Softmax classifiers on pixels and k-sparse features; fine-tuning; error counting."""
import jax
import jax.numpy as jnp
import numpy as np

from ksae_jax import classify, models
from ksae_jax.config import ImageModel


def quadrant_images(n, seed=0):
    """Class c in 0..3 lights up quadrant c: linearly separable."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 2)
        x[i, 14 * r:14 * r + 14, 14 * q:14 * q + 14] += 180
    return x, y


def test_raw_pixel_classifier_learns_a_separable_problem():
    x, y = quadrant_images(400)
    xt, yt = quadrant_images(200, seed=1)
    state = classify.fit({"cls": classify.init_linear(784, 1)}, x, y, [0], cfg=None, max_k=1,
                         epochs=5, lr=1e-2, batch_size=50, progress=False)
    assert classify.error_rate(state, xt, yt, [0], cfg=None, max_k=1)[0] == 0.0
    untrained = {"cls": classify.init_linear(784, 1)}  # all-zero logits: always class 0
    np.testing.assert_allclose(classify.error_rate(untrained, xt, yt, [0], cfg=None, max_k=1),
                               100 * np.mean(yt != 0))


def test_error_rate_counts_wrong_predictions_over_padded_batches():
    x, y = quadrant_images(130)
    w = np.zeros((1, 10, 784), np.float32)
    w[0, 3, :] = 1.0  # always predicts class 3
    state = {"cls": {"weight": jnp.asarray(w), "bias": jnp.zeros((1, 10))}}
    got = classify.error_rate(state, x, y, [0], cfg=None, max_k=1, batch_size=48)
    np.testing.assert_allclose(got, [100 * np.mean(y != 3)])


def test_feature_classifiers_are_vmapped_over_models_and_finetuning_moves_the_encoder():
    cfg = ImageModel("mlp", hidden=32, tied=True)
    enc = jax.vmap(models.family(cfg).init)(jax.random.split(jax.random.key(0), 2))
    x, y = quadrant_images(300)
    n_active = [4, 12]
    state = {"cls": classify.init_linear(32, 2), "enc": enc}
    fitted = classify.fit(state, x, y, n_active, cfg=cfg, max_k=12, epochs=3, lr=1e-2,
                          batch_size=50, progress=False)
    for a, b in zip(jax.tree.leaves(fitted["enc"]), jax.tree.leaves(enc)):
        np.testing.assert_array_equal(a, b)  # frozen encoder
    errs = classify.error_rate(fitted, x, y, n_active, cfg=cfg, max_k=12)
    assert errs.shape == (2,) and (errs < 50).all()
    # each model alone gives the same classifier as inside the vmapped pair
    alone = classify.fit({"cls": classify.init_linear(32, 1), "enc": jax.tree.map(lambda a: a[1:], enc)},
                         x, y, n_active[1:], cfg=cfg, max_k=12, epochs=3, lr=1e-2, batch_size=50,
                         progress=False)
    np.testing.assert_allclose(alone["cls"]["weight"][0], fitted["cls"]["weight"][1], rtol=1e-4,
                               atol=1e-5)
    tuned = classify.fit(fitted, x, y, n_active, cfg=cfg, max_k=12, epochs=2, lr=1e-3,
                         batch_size=50, finetune=True, progress=False)
    assert not np.allclose(tuned["enc"]["enc"]["weight"], enc["enc"]["weight"])
    assert (classify.error_rate(tuned, x, y, n_active, cfg=cfg, max_k=12) <= errs + 1.0).all()


def test_features_keep_n_active_units():
    cfg = ImageModel("mlp", hidden=40)
    p = models.family(cfg).init(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (5, 28, 28))
    f = classify.features(x, p, 9, cfg=cfg, max_k=20)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(f), axis=1), 9)
    np.testing.assert_array_equal(classify.features(x, None, 0, cfg=None, max_k=1), x.reshape(5, -1))
