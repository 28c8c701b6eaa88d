"""Transcoders: the forward and its gradient against NumPy (every decoder path, skip map
included), and a sweep over k that learns an MLP's map from its inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import models, step, train
from ksae_jax.config import Optimizer, SweepConfig
from ksae_jax.evaluate import EvalSet, evaluate
from ksae_jax.data.feed import ArrayRows
from ksae_jax.models.transcoder import TranscoderModel


def _np_reference(P, x, w, k, d, batch=False):
    """(loss, grads, recon): FVU of the output half from the top k of W_enc src + b_enc per
    row, or (batch) the top (real rows x k) of the batch's ReLU activations."""
    src, tgt = x[:, :d], x[:, d:]
    pre = src @ P["W_enc"].T + P["b_enc"]
    mask = np.zeros_like(pre, bool)
    if batch:
        flat = np.where(w[:, None] > 0, np.maximum(pre, 0), -1).ravel()
        mask.ravel()[np.argsort(-flat, kind="stable")[:int(w.sum()) * k]] = True
    else:
        np.put_along_axis(mask, np.argsort(-pre, axis=1, kind="stable")[:, :k], True, axis=1)
    mask &= pre > 0
    z = np.where(mask, pre, 0.0)
    recon = z @ P["W_dec"] + P["b_dec"] + (src @ P["W_skip"].T if "W_skip" in P else 0)
    mean = (w @ tgt) / w.sum()
    denom = np.sum(w[:, None] * (tgt - mean) ** 2)
    err = recon - tgt
    loss = np.sum(w[:, None] * err ** 2) / denom
    g_recon = 2 * w[:, None] * err / denom
    g_z = (g_recon @ P["W_dec"].T) * mask
    grads = {"W_dec": z.T @ g_recon, "b_dec": g_recon.sum(0), "W_enc": g_z.T @ src,
             "b_enc": g_z.sum(0)}
    if "W_skip" in P:
        grads["W_skip"] = g_recon.T @ src
    return loss, grads, recon


@pytest.mark.parametrize("arch,decoder,activation", [
    ("transcoder", "dense", "topk"), ("transcoder", "sparse", "topk"),
    ("skip-transcoder", "sparse", "topk"), ("skip-transcoder", "sparse", "batchtopk")])
def test_forward_and_gradient_match_numpy(arch, decoder, activation):
    d, n, k = 6, 24, 3
    model = TranscoderModel(d_in=d, latents=n, arch=arch, decoder=decoder, aux_coef=0.0,
                            activation=activation)
    family = models.family(model)
    rng = np.random.default_rng(0)
    p = jax.tree.map(np.asarray, family.init(jax.random.key(1)))
    p = {name: v + rng.normal(0, 0.1, v.shape).astype(np.float32) for name, v in p.items()}
    x = rng.normal(size=(10, 2 * d)).astype(np.float32)
    w = np.array([1.0] * 8 + [0.0] * 2, np.float32)  # two padding rows
    P = {name: v.astype(np.float64) for name, v in p.items()}
    P.pop("threshold", None)
    want_loss, want_grads, want_recon = _np_reference(P, x.astype(np.float64), w, k, d,
                                                      batch=activation == "batchtopk")

    def loss(params):
        out = family.forward(params, x, w, {"k": jnp.int32(k)}, k)
        return family.loss_terms(out, {}).reconstruction, out

    (got, out), grads = jax.value_and_grad(loss, has_aux=True)(jax.tree.map(jnp.asarray, p))
    assert float(got) == pytest.approx(want_loss, rel=1e-5)
    np.testing.assert_allclose(out.recon, want_recon, rtol=1e-5, atol=1e-5)
    assert set(grads) - {"threshold"} == set(want_grads)
    for name, g in want_grads.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-6, err_msg=name)
    if activation == "batchtopk":  # served as a JumpReLU with the one trained threshold
        served = family.forward({**jax.tree.map(jnp.asarray, p), "threshold": jnp.float32(0.3)},
                                x, w, {"k": jnp.int32(k)}, k, terms=False)
        pre = x[:, :d] @ p["W_enc"].T + p["b_enc"]
        np.testing.assert_allclose(served.code, np.where(pre > 0.3, pre, 0), rtol=1e-5, atol=1e-6)


def _mlp_pairs(rows: int, d: int, seed: int = 0):
    """[x | MLP(x)] rows of one random MLP, x sparse."""
    rng = np.random.default_rng(seed)
    W1, W2 = rng.normal(size=(d, 4 * d)) / np.sqrt(d), rng.normal(size=(4 * d, d)) / np.sqrt(4 * d)
    x = rng.normal(size=(rows, d)) * (rng.random((rows, d)) < 0.3)
    return np.concatenate([x, np.maximum(x @ W1, 0) @ W2], axis=1).astype(np.float32)


@pytest.mark.parametrize("init,activation", [("zero", "topk"), ("paired", "topk"),
                                             ("paired", "batchtopk")])
def test_a_sweep_over_k_learns_an_mlp_and_inference_transcodes(init, activation):
    d = 8
    pairs = _mlp_pairs(5120, d)
    pairs, held = pairs[:4096], pairs[4096:]
    cfg = SweepConfig(model=TranscoderModel(d_in=d, latents=64, transcoder_init=init,
                                                  activation=activation), ks=(4, 16),
                      steps=150, batch_size=256, optim=Optimizer(lr=3e-3))
    result = train.train_sweep(cfg, pairs, progress=False)
    ev = evaluate(cfg, jax.tree.map(np.asarray, result.params), EvalSet(ArrayRows(held)))
    assert ev.fvu[1] < ev.fvu[0] < 0.5  # the MLP is learnt, better with more latents
    assert np.all(ev.l0 <= np.array([4, 16]) * (1.5 if activation == "batchtopk" else 1))
    served = result.models().transcode(held[:, :d], 16)  # inputs only: outputs reconstructed
    fvu = np.sum((served - held[:, d:]) ** 2) / np.sum((held[:, d:] - held[:, d:].mean(0)) ** 2)
    assert fvu == pytest.approx(ev.fvu[1], rel=1e-4)
