"""Models: the original conv network's shapes and size; the paper's MLP; functional API."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ksae_jax import models
from ksae_jax.config import ImageModel
from ksae_jax.models.images import count_params, forward_flops


def init(cfg, seed):
    return models.family(cfg).init(jax.random.key(seed))


def forward(cfg, params, x, k):
    return models.family(cfg).forward(params, x, jnp.ones(x.shape[0]), {"k": k}, k)


def test_conv_layer_shapes_match_the_original():
    cfg = ImageModel("conv")
    params = init(cfg, 0)
    x = jnp.full((3, 28, 28), 0.5)
    out = forward(cfg, params, x, 25)
    # the original's 8 activations (NCHW there, NHWC here)
    assert [a.shape for a in out.acts] == [
        (3, 14, 14, 16), (3, 7, 7, 32), (3, 3, 3, 64), (3, 256),
        (3, 576), (3, 7, 7, 32), (3, 14, 14, 16), (3, 28, 28)]
    assert out.recon.shape == (3, 28, 28)
    shapes = jax.tree.map(np.shape, params)
    assert shapes["enc1"]["weight"] == (16, 1, 3, 3)       # torch Conv2d layout
    assert shapes["dec2"]["weight"] == (64, 32, 5, 5)      # torch ConvTranspose2d layout
    assert shapes["enc4"]["weight"] == (256, 576)          # torch Linear layout
    # 408k parameters, counted layer by layer from the original's definition
    expected = (16 * 9 + 16) + (32 * 16 * 9 + 32) + (64 * 32 * 25 + 64) + (576 * 256 + 256) \
        + (256 * 576 + 576) + (64 * 32 * 25 + 32) + (32 * 16 * 9 + 16) + (16 * 9 + 1)
    assert count_params(params) == expected == 407_809


def test_init_follows_torch_default_bounds():
    params = init(ImageModel("conv"), 0)
    for name, fan_in in [("enc1", 9), ("enc3", 800), ("enc4", 576), ("dec2", 32 * 25), ("dec4", 9)]:
        w = np.asarray(params[name]["weight"])
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_code_keeps_the_k_largest_units_and_outputs_are_nonnegative():
    cfg = ImageModel("conv")
    params = init(cfg, 1)
    x = jax.random.uniform(jax.random.key(2), (4, 28, 28))
    out = forward(cfg, params, x, 10)
    dense, code = np.asarray(out.dense), np.asarray(out.code)
    top = np.argsort(-dense, axis=1, kind="stable")[:, :10]
    want = np.zeros_like(dense)
    np.put_along_axis(want, top, np.take_along_axis(dense, top, axis=1), axis=1)
    np.testing.assert_array_equal(code, want)  # the 10 largest of each row, the rest zero
    assert (np.count_nonzero(code, axis=1) > 0).all() and (dense >= 0).all()
    assert (np.asarray(out.recon) >= 0).all() and np.asarray(out.recon).max() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_mlp(tied):
    cfg = ImageModel("mlp", hidden=50, tied=tied)
    params = init(cfg, 0)
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28))
    out = forward(cfg, params, x, 5)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(out.code), axis=1), 5)
    assert out.recon.shape == (4, 28, 28)
    code = out.code
    w_dec = params["enc"]["weight"] if tied else params["dec"]["weight"].T
    b_dec = params["dec_bias"] if tied else params["dec"]["bias"]
    np.testing.assert_allclose(out.recon.reshape(4, -1), code @ w_dec + b_dec, rtol=1e-5, atol=1e-6)
    assert ("dec" in params) == (not tied)


def test_bce_output_is_sigmoid_of_logits():
    cfg = ImageModel("conv", loss="bce")
    params = init(cfg, 0)
    out = forward(cfg, params, jnp.full((2, 28, 28), 0.3), 5)
    np.testing.assert_allclose(out.recon, jax.nn.sigmoid(out.logits), rtol=1e-6)


def test_module_and_functional_paths_agree():
    cfg = ImageModel("conv")
    family = models.family(cfg)
    m = family.module(nnx.Rngs(params=jax.random.key(3)))
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    x = jax.random.uniform(jax.random.key(4), (2, 28, 28))
    np.testing.assert_array_equal(m(x, jnp.ones(2), {"k": 7}, 7).recon,
                                  forward(cfg, params, x, 7).recon)
    np.testing.assert_array_equal(params["enc1"]["weight"], init(cfg, 3)["enc1"]["weight"])
    np.testing.assert_array_equal(family.decode(params, forward(cfg, params, x, 7).code),
                                  forward(cfg, params, x, 7).recon)


def test_config_validation():
    with pytest.raises(ValueError, match="arch"):
        ImageModel("resnet")
    with pytest.raises(ValueError, match="tied"):
        ImageModel("conv", tied=True)
    with pytest.raises(ValueError, match="hidden"):
        ImageModel("mlp", hidden=0)
    with pytest.raises(ValueError, match="l1 must be >= 0"):
        ImageModel("mlp", l1=-1e-4)


def test_forward_flops_counts_the_layers():
    # conv: 1,724,544 multiply-adds, summed by hand from the original's layer shapes
    macs = 14 * 14 * 16 * 9 + 7 * 7 * 32 * 16 * 9 + 3 * 3 * 64 * 32 * 25 + 2 * 576 * 256 \
        + 3 * 3 * 64 * 32 * 25 + 7 * 7 * 32 * 16 * 9 + 14 * 14 * 16 * 9
    assert forward_flops(ImageModel("conv")) == 2 * macs == 3_449_088
    assert forward_flops(ImageModel("mlp", hidden=1000)) == 2 * 2 * 784 * 1000
