"""Training: the vmapped sweep equals one-k-at-a-time training; padding and metrics are exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import train
from ksae_jax.config import ModelConfig, SweepConfig


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (130, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_vmapped_sweep_equals_each_k_alone(images, arch):
    base = dict(model=ModelConfig(arch, hidden=64 if arch == "mlp" else None), epochs=2,
                batch_size=50, seed=3)
    ks = (3, 12)
    sweep = train.train_sweep(SweepConfig(ks=ks, **base), images, images[:20], progress=False)
    for i, k in enumerate(ks):
        # max_k differs between the runs (12 vs k), which must not matter
        alone = train.train_sweep(SweepConfig(ks=(k,), **base), images, images[:20], progress=False)
        for a, b in zip(jax.tree.leaves(sweep.params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(a[i], b[0], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(sweep.history["train_loss"][i], alone.history["train_loss"][0],
                                   rtol=1e-5)
        np.testing.assert_allclose(sweep.history["test_mse"][i], alone.history["test_mse"][0],
                                   rtol=1e-5)


def test_training_reduces_the_loss(digits):
    cfg = SweepConfig(ks=(10, 40), epochs=3, batch_size=50)
    r = train.train_sweep(cfg, digits.x_train[:600], digits.x_test[:200], progress=False)
    for losses in r.history["train_loss"]:
        assert losses[-1] < 0.8 * losses[0]
    untrained = train.evaluate(cfg.model, train.init_models(cfg)[0], digits.x_test[:200], cfg.ks)
    assert (np.array([h[-1] for h in r.history["test_mse"]]) < 0.8 * untrained).all()


def test_evaluate_is_the_true_mean_over_the_test_set(images):
    cfg = SweepConfig(ks=(4, 9), batch_size=50)
    params, _ = train.init_models(cfg)
    from ksae_jax import model
    got = train.evaluate(cfg.model, params, images, cfg.ks, batch_size=48)  # 130 = 2*48 + 34
    x = images.astype(np.float32) / 255
    for i, k in enumerate(cfg.ks):
        p = jax.tree.map(lambda a: a[i], params)
        recon = model.apply(cfg.model, p, jnp.asarray(x), k, k).recon
        np.testing.assert_allclose(got[i], np.mean((np.asarray(recon) - x) ** 2), rtol=1e-5)


def test_padded_batch_equals_the_unpadded_batch(images):
    """The last, partial batch is padded to a full one with zero weights: same gradient."""
    cfg = ModelConfig("conv")
    from ksae_jax.model import init_params
    params = init_params(cfg, jax.random.key(0))
    tx = train.make_optimizer(1e-3)
    x = jnp.asarray(images[:30], jnp.float32) / 255
    step = jax.jit(lambda b: train.train_step(params, tx.init(params), b, 5, 1e-4, cfg=cfg, tx=tx,
                                              max_k=5))
    small = step({"x": x, "w": jnp.ones(30)})
    padded = step({"x": jnp.concatenate([x, jnp.ones((20, 28, 28))]),
                   "w": jnp.concatenate([jnp.ones(30), jnp.zeros(20)])})
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(padded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_epoch_order_is_a_padded_permutation():
    order = np.asarray(train.epoch_order(jax.random.key(0), 130, 50))
    assert order.shape == (150,)
    np.testing.assert_array_equal(np.sort(order[order >= 0]), np.arange(130))
    assert (order[130:] == -1).all()


def test_k_schedule_moves_from_k_start_to_each_k():
    cfg = SweepConfig(model=ModelConfig("mlp"), ks=(10, 40), epochs=4, k_start=100,
                      k_anneal_epochs=2)
    np.testing.assert_array_equal(train.k_at(cfg, 0), [100, 100])
    np.testing.assert_array_equal(train.k_at(cfg, 1), [55, 70])
    np.testing.assert_array_equal(train.k_at(cfg, 2), [10, 40])
    np.testing.assert_array_equal(train.k_at(cfg, 3.5), [10, 40])
    assert cfg.max_k == 100


@pytest.mark.parametrize("kwargs,match", [
    (dict(ks=()), "empty"), (dict(ks=(0,)), "k must be positive"), (dict(ks=(300,)), "larger"),
    (dict(ks=(5, 5)), "repeated"), (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"),
    (dict(l1=-1e-4), "l1"), (dict(ks=(2.5,)), "integer")])
def test_sweep_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepConfig(**kwargs)


def test_loop_and_vmap_batching_agree(images):
    runs = [train.train_sweep(SweepConfig(ks=(3, 12), epochs=1, batch_size=50, batching=b),
                              images, images[:20], progress=False) for b in ("loop", "vmap")]
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(runs[0].history["test_mse"], runs[1].history["test_mse"], rtol=1e-5)


def test_loop_over_models_is_the_function_itself_without_vmap():
    f = train.loop_over_models(lambda a, b: a * b + 1)
    np.testing.assert_array_equal(f(jnp.arange(3.0), 2.0), jnp.arange(3.0) * 2 + 1)
    batched = jax.vmap(f, in_axes=(0, None))(jnp.ones((4, 3)), jnp.float32(2))
    np.testing.assert_array_equal(batched, jnp.full((4, 3), 3.0))
