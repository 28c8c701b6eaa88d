"""Training: the sweep equals one-k-at-a-time training; padding, budgets, schedule and metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import batching, models, optim, sae_config, step, train
from ksae_jax.config import Execution, ImageModel, Optimizer, SweepConfig
from ksae_jax.data.feed import ArrayRows
from ksae_jax.evaluate import EvalSet, evaluate


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (130, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_sweep_equals_each_k_alone(images, arch):
    base = dict(model=ImageModel(arch, hidden=64 if arch == "mlp" else None), epochs=2,
                batch_size=50, seed=3)
    ks = (3, 12)
    sweep = train.train_sweep(SweepConfig(ks=ks, **base), images, images[:20], progress=False)
    for i, k in enumerate(ks):
        # the top-k width differs between the runs (12 vs k), which must not matter
        alone = train.train_sweep(SweepConfig(ks=(k,), **base), images, images[:20], progress=False)
        for a, b in zip(jax.tree.leaves(sweep.params), jax.tree.leaves(alone.params)):
            np.testing.assert_allclose(a[i], b[0], rtol=2e-5, atol=2e-6)
        for name in ("train_loss", "eval_mse"):
            np.testing.assert_allclose(sweep.history[name][i], alone.history[name][0], rtol=1e-5)


def test_training_reduces_the_loss(digits):
    cfg = SweepConfig(ks=(10, 40), epochs=3, batch_size=50)
    r = train.train_sweep(cfg, digits.x_train[:600], digits.x_test[:200], progress=False)
    for losses in r.history["train_loss"]:
        assert losses[-1] < 0.8 * losses[0]
    untrained = evaluate(cfg, step.init_state(cfg).params,
                         EvalSet(ArrayRows(digits.x_test[:200], 1 / 255))).mse
    assert (np.array([h[-1] for h in r.history["eval_mse"]]) < 0.8 * untrained).all()


def test_evaluate_is_the_true_mean_over_the_test_set(images):
    cfg = SweepConfig(ks=(4, 9), batch_size=50)
    params = step.init_state(cfg).params
    got = evaluate(cfg, params, EvalSet(ArrayRows(images, 1 / 255), batch_size=48))  # 130 = 2*48 + 34
    x = images.astype(np.float32) / 255
    for i, k in enumerate(cfg.ks):
        p = jax.tree.map(lambda a: a[i], params)
        out = models.family(cfg.model).forward(p, jnp.asarray(x), jnp.ones(len(x)), {"k": k}, k)
        np.testing.assert_allclose(got.mse[i], np.mean((np.asarray(out.recon) - x) ** 2), rtol=1e-5)
        np.testing.assert_allclose(got.l0[i], np.count_nonzero(np.asarray(out.code)) / len(x), rtol=1e-6)
        np.testing.assert_array_equal(got.counts[i], np.count_nonzero(np.asarray(out.code), axis=0))
    assert got.fvu.shape == (2,) and (got.fvu > 0).all()


def test_padded_batch_equals_the_unpadded_batch(images):
    """The last, partial batch is padded to a full one with zero weights: same step."""
    cfg = SweepConfig(model=ImageModel(l1=1e-4), ks=(5,))
    params = models.family(cfg.model).init(jax.random.key(0))
    opt = optim.make_optimizer(cfg.optim).init(params)
    since = jnp.zeros(cfg.model.hidden, jnp.int32)
    x = jnp.asarray(images[:30], jnp.float32) / 255
    hp = {"k": 5, "lr": 1e-3, "l1": 1e-4}
    one = jax.jit(lambda b: step.train_step(params, opt, since, hp, True, b, 0,
                                            cfg=step.resolved(cfg, 30), max_k=5))
    small = one({"x": x, "w": jnp.ones(30)})
    padded = one({"x": jnp.concatenate([x, jnp.ones((20, 28, 28))]),
                  "w": jnp.concatenate([jnp.ones(30), jnp.zeros(20)])})
    for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(padded)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_adam_matches_pytorch_bias_correction():
    """PyTorch computes 1 - b^t in float64; ours in float32 via expm1/log1p must agree."""
    tx = optim.scale_by_adam()
    p = {"w": jnp.zeros(3)}
    state = tx.init(p)
    g = {"w": jnp.array([1e-3, -2.0, 5.0])}
    m = v = np.zeros(3)
    for t in range(1, 7):
        direction, state = tx.update(g, state)
        m = 0.9 * m + 0.1 * np.float64(g["w"])
        v = 0.999 * v + 0.001 * np.float64(g["w"]) ** 2
        want = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        np.testing.assert_allclose(direction["w"], want, rtol=1e-6)  # optax: 2e-5 at t = 1


def test_budget_in_steps_or_epochs():
    per_epoch = -(-60_000 // 600)
    b = train.make_budget(SweepConfig(), 60_000)  # the original: 9 epochs of 600
    assert (b.steps, b.steps_per_epoch, b.eval_every, b.epochs) == (900, per_epoch, 100, 9.0)
    b = train.make_budget(SweepConfig(steps=1000, batch_size=100), 4000)
    assert (b.steps, b.steps_per_epoch, b.eval_every) == (1000, 40, 100)  # 25 epochs: 10 evals
    b = train.make_budget(SweepConfig(steps=5, batch_size=100), 130)
    assert (b.steps, b.eval_every, b.segment_ends(0), b.segment_ends(2)) == (5, 2, [2, 4, 5], [4, 5])
    assert train.make_budget(SweepConfig(epochs=2, batch_size=50), 130).steps == 6
    with pytest.raises(ValueError, match="steps or epochs, not both"):
        SweepConfig(steps=5, epochs=2)


def test_run_makes_exactly_the_budgeted_steps(images, tmp_path):
    from ksae_jax.checkpoint import Checkpoints
    cfg = SweepConfig(model=ImageModel("mlp", hidden=32), ks=(3,), steps=5, batch_size=50)
    r = train.train_sweep(cfg, images, progress=False, checkpoint=tmp_path / "checkpoints")
    ckpts = Checkpoints(tmp_path / "checkpoints")
    state, meta = ckpts.restore(train.prepare(cfg, images).abstract_state())
    assert ckpts.latest() == 5 == meta["step"] and int(state.opt_state.count[0]) == 5
    assert r.history["step"] == [3, 5] and r.budget.steps == 5  # every epoch of 3 steps


def test_k_schedule_moves_from_k_start_to_each_k():
    cfg = SweepConfig(model=ImageModel("mlp"), ks=(10, 40), steps=400,
                      optim=Optimizer(k_start=100, k_anneal_frac=0.5))
    np.testing.assert_array_equal(step.k_at(cfg, 0, 400), [100, 100])
    np.testing.assert_array_equal(step.k_at(cfg, 100, 400), [55, 70])
    np.testing.assert_array_equal(step.k_at(cfg, 200, 400), [10, 40])
    np.testing.assert_array_equal(step.k_at(cfg, 350, 400), [10, 40])
    assert cfg.max_k == 100 and cfg.max_ks == (100, 100)


@pytest.mark.parametrize("make,match", [
    (lambda: SweepConfig(ks=()), "empty"), (lambda: SweepConfig(ks=(0,)), "k must be positive"),
    (lambda: SweepConfig(ks=(300,)), "larger"), (lambda: SweepConfig(ks=(5, 5)), "repeated"),
    (lambda: SweepConfig(batch_size=0), "batch_size"), (lambda: Optimizer(lr=-1.0), "lr"),
    (lambda: SweepConfig(ks=(2.5,)), "integer"), (lambda: SweepConfig(steps=0), "steps"),
    (lambda: SweepConfig(optim=Optimizer(lr=(1e-3,))), "one value per k"),
    (lambda: SweepConfig(init_seeds=(1, 2)), "one seed per k"),
    (lambda: Optimizer(k_start=50, k_anneal_frac=0.0), "k_anneal_frac > 0"),
    (lambda: SweepConfig(ks=(5,), optim=Optimizer(k_start=300)), "k_start=300 is larger"),
    (lambda: Optimizer(momentum=0.5), "momentum applies to optimizer 'sgd'"),
    (lambda: Execution(batching="scan"), "batching must be one of"),
    (lambda: sae_config(8, (2,), l0_coefs=(1e-3,)), "l0_coefs are JumpReLU's"),
    (lambda: sae_config(8, (2,), arch="jumprelu"), "JumpReLU has no k"),
    (lambda: sae_config(8, (2,), init_mix=2.0), "init_mix: only init_dirs 'mixed'"),
    (lambda: sae_config(8, (2,), b_enc_init="zero", b_enc_mean_keep=1.0), "only b_enc_init"),
    (lambda: sae_config(8, (2,), arch="batchtopk", multi_topk=True), "'multi_topk' is not a setting")])
def test_configs_refuse_bad_values_naming_the_setting(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_defaults_left_unset_are_the_models():
    images, sae = SweepConfig(), sae_config(512, latents=2 ** 16)
    assert (images.ks, images.batch_size, images.seed) == ((5, 10, 25, 50, 100), 600, 1)
    assert (images.optim.lr, images.optim.adam_eps, images.model.aux_coef) == (1e-3, 1e-8, 0.0)
    assert (sae.ks, sae.batch_size, sae.seed) == ((16, 32, 64, 128), 4096, 0)
    assert (sae.optim.lr, sae.optim.adam_eps, sae.model.aux_coef) == (1e-4, 6.25e-10, 1 / 32)
    jump = sae_config(512, arch="jumprelu")
    assert (jump.ks, jump.l0_coefs, jump.label_name, jump.max_ks) == \
        ((), (3e-4, 1e-3, 3e-3, 1e-2), "l0_coef", (None,) * 4)
    given = sae_config(512, (8,), batch_size=100, seed=7, lr=3e-3, adam_eps=1e-8)
    assert (given.batch_size, given.seed, given.optim.lr, given.optim.adam_eps) == \
        (100, 7, 3e-3, 1e-8)


def test_loop_and_vmap_batching_agree(images):
    runs = [train.train_sweep(SweepConfig(ks=(3, 12), epochs=1, batch_size=50,
                                          execution=Execution(batching=b)),
                              images, images[:20], progress=False) for b in ("loop", "vmap")]
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(runs[0].history["eval_mse"], runs[1].history["eval_mse"], rtol=1e-5)


def test_auto_batching_is_chosen_by_backend():
    assert batching.choose("cpu") == "loop"
    assert batching.choose("gpu") == "vmap" and batching.choose("tpu") == "vmap"
    assert batching.resolve(SweepConfig(execution=Execution(batching="vmap"))) == "vmap"


def test_over_models_gives_each_model_its_own_static_width():
    cfg = SweepConfig(model=ImageModel("mlp"), ks=(2, 7))
    seen = []

    def fn(a, b, *, max_k):
        seen.append(max_k)
        return (a * b + max_k,)

    (out,) = batching.over_models(fn, cfg, "loop", (jnp.arange(2.0),), (jnp.float32(10),))
    assert isinstance(out, batching.Models) and seen == [2, 7]
    np.testing.assert_array_equal(batching.stacked(out), [0 * 10 + 2, 1 * 10 + 7])
    models = batching.split({"w": jnp.arange(6.0).reshape(2, 3)}, 2)
    (out,) = batching.over_models(lambda p, *, max_k: (p["w"].sum(),), cfg, "loop", (models,))
    np.testing.assert_array_equal(batching.stacked(out), [3, 12])
    (out,) = batching.over_models(fn, cfg, "vmap", (jnp.arange(2.0),), (jnp.float32(10),))
    np.testing.assert_array_equal(out, [7, 17])  # one program: the largest width


def test_per_model_learning_rates_and_seeds(images):
    base = dict(model=ImageModel("mlp", hidden=32), steps=3, batch_size=50)
    both = train.train_sweep(SweepConfig(ks=(3, 4), optim=Optimizer(lr=(1e-3, 3e-3)),
                                         init_seeds=(5, 6), **base), images, progress=False)
    second = train.train_sweep(SweepConfig(ks=(4,), optim=Optimizer(lr=3e-3), init_seeds=(6,),
                                           **base), images, progress=False)
    for a, b in zip(jax.tree.leaves(both.params), jax.tree.leaves(second.params)):
        np.testing.assert_allclose(a[1], b[0], rtol=2e-5, atol=2e-6)


def test_training_entry_points_check_their_arrays(images):
    cfg = SweepConfig(ks=(5,), epochs=1, batch_size=100)
    with pytest.raises(ValueError, match=r"train must be a non-empty uint8 array of shape \(N, 28, 28\), got float64"):
        train.train_sweep(cfg, images / 255.0)
    with pytest.raises(ValueError, match="test must be"):
        train.train_sweep(cfg, images, images[:, :14])
    with pytest.raises(ValueError, match="on_nan"):
        train.train_sweep(cfg, images, on_nan="ignore")

