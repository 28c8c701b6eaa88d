"""Makhzani & Frey's protocol (python -m experiments.paper_table): the table end to end on a
tiny config, the validation choice, the authors' own training (--recipe paper: its step
against a PyTorch reference, its init and loss, the flags that set it) and the learning
curve's snapshots."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ksae_jax import (cli, flags, formats, image_recipes, image_run, models, optim, paper_table,
                      step)
from ksae_jax.config import ImageModel, Optimizer, SweepConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(digits):
    return digits.x_train[:200]


def test_tiny_paper_table_writes_every_output(tmp_path):
    out = tmp_path / "table"
    paper_table.main(["--dataset", "mnist-sample", "--train-limit", "400", "--ks", "5", "10",
                      "--hidden", "64", "--epochs", "2", "--k-start", "30", "--cls-epochs", "2",
                      "--cls-l2", "0", "1e-3", "--finetune", "--ft-epochs", "1", "--batch-size",
                      "100", "--no-progress", "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"table.md", "table.json", "features.png", "params.pkl",
                                               "checkpoints"}
    t = json.loads((out / "table.json").read_text())
    names = [r["name"] for r in t["rows"]]
    assert names == ["raw pixels", "k = 5", "k = 10", "k = 5 fine-tuned", "k = 10 fine-tuned"]
    for r in t["rows"]:
        assert 0 <= r["test_error_pct"] <= 100 and 0 <= r["val_error_pct"] <= 100
        assert 1 <= r["epoch"] <= 2  # the epoch chosen on validation
    for r in t["rows"][1:3]:
        assert 0 <= r["dead_units_pct"] <= 100 and 0 < r["recon_mse"] < 0.2
    assert t["choices"]["n_active"] == [15, 30] and t["config"]["optim"]["k_start"] == 30
    assert t["cls_l2"] == [0.0, 1e-3] and len(t["choices"]["features"]["l2"]) == 2
    assert set(t["choices"]["features"]["l2"]) <= {0.0, 1e-3}  # as given, not float32
    assert (t["n_train"], t["n_val"]) == (334, 66)  # a sixth of the 400 held out
    assert {k: t["config"]["model"][k] for k in ("arch", "hidden", "tied", "loss")} == \
        {"arch": "mlp", "hidden": 64, "tied": True, "loss": "mse"}
    md = (out / "table.md").read_text()
    assert "| k = 10 fine-tuned |" in md and "| raw pixels |" in md and "validation error %" in md
    assert "the epoch and the L2 penalty (of 0, 0.001) chosen on validation" in md
    assert "L2 penalties chosen: raw pixels " in md
    assert (out / "features.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_choice_keeps_the_best_epoch_per_model():
    from test_classify import quadrant_images

    from ksae_jax import classify
    x, y = quadrant_images(300)
    xv, yv = quadrant_images(100, seed=5)
    state, choice = classify.fit_on_validation(
        {"cls": classify.init_linear(784, 2)}, x, y, [0, 0], (xv, yv), cfg=None, max_k=1,
        epochs=3, lr=1e-2, batch_size=50, progress=False)
    errs = classify.error_rate(state, xv, yv, [0, 0], cfg=None, max_k=1)
    np.testing.assert_allclose(errs, choice["val_error_pct"])
    assert all(1 <= e <= 3 for e in choice["epoch"])



def test_each_classifier_keeps_the_l2_penalty_best_on_validation(digits):
    """One vmapped fit over (penalty, model): a penalty of zero is no penalty, a large one
    shrinks the weights, and each model keeps the penalty whose fit is best on validation."""
    from ksae_jax import classify
    x, y = digits.x_train[:300], digits.y_train[:300]
    val = (digits.x_train[300:500], digits.y_train[300:500])
    kw = dict(cfg=None, max_k=1, lr=1e-2, batch_size=50, progress=False)
    init = {"cls": classify.init_linear(784, 2)}
    plain, plain_choice = classify.fit_on_validation(init, x, y, [0, 0], val, epochs=2, **kw)
    zero, _ = classify.fit_on_validation(init, x, y, [0, 0], val, epochs=2, l2=[0.0, 0.0], **kw)
    np.testing.assert_array_equal(zero["cls"]["weight"], plain["cls"]["weight"])
    big, big_choice = classify.fit_on_validation(init, x, y, [0, 0], val, epochs=2, l2=[1.0, 1.0],
                                                 **kw)
    assert np.linalg.norm(big["cls"]["weight"]) < 0.5 * np.linalg.norm(plain["cls"]["weight"])
    ds = type("Data", (), {"x_train": x, "y_train": y})
    table = paper_table.PaperTable(cls_epochs=2, cls_l2=(1.0, 0.0))  # the worse one listed first
    state, choice = paper_table.fit_choosing_l2(table, init, ds, [0, 0], val, **kw)
    errs = np.array([big_choice["val_error_pct"], plain_choice["val_error_pct"]])
    assert (errs[1] < errs[0]).all() and choice["l2"] == [0.0, 0.0]
    np.testing.assert_allclose(choice["val_error_pct"], errs[1], atol=1e-4)
    np.testing.assert_allclose(state["cls"]["weight"], plain["cls"]["weight"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="cls_l2 must be one or more penalties >= 0"):
        paper_table.PaperTable(cls_l2=(-1.0,))


PAPER_MODEL = ImageModel("mlp", hidden=50, tied=True, loss="half_sse", l1=0.0,
                         activation="relu", init_std=0.01)


def _torch_paper_steps(params: dict, batches, k: int, lr: float, momentum: float):
    """The authors' step written directly in PyTorch: tied weights, relu then the top-k mask,
    linear output, 0.5 * summed squared error averaged over the batch, SGD with momentum."""
    import torch
    w = torch.tensor(np.asarray(params["enc"]["weight"]), requires_grad=True)
    b = torch.tensor(np.asarray(params["enc"]["bias"]), requires_grad=True)
    c = torch.tensor(np.asarray(params["dec_bias"]), requires_grad=True)
    opt = torch.optim.SGD([w, b, c], lr=lr, momentum=momentum)
    for x in batches:
        x = torch.tensor(x.reshape(len(x), -1))
        h = torch.relu(x @ w.T + b)
        mask = torch.zeros_like(h).scatter(1, torch.topk(h, k, dim=1).indices, 1.0)
        recon = (h * mask) @ w + c
        loss = 0.5 * ((recon - x) ** 2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"enc": {"weight": w.detach().numpy(), "bias": b.detach().numpy()},
            "dec_bias": c.detach().numpy()}


def test_paper_step_matches_pytorch_sgd_with_momentum(images):
    pytest.importorskip("torch", reason="the LM extra (pip install .[lm]) brings torch")
    cfg = SweepConfig(model=PAPER_MODEL, ks=(7,), batch_size=32,
                      optim=Optimizer(optimizer="sgd", momentum=0.9, lr=0.01))
    params = models.family(cfg.model).init(jax.random.key(3))
    opt = optim.make_optimizer(cfg.optim).init(params)
    since = jnp.zeros(cfg.model.hidden, jnp.int32)
    batches = [np.asarray(images[i * 32:(i + 1) * 32], np.float32) / 255 for i in range(4)]
    run_cfg = step.resolved(cfg, len(images))
    ours = params
    for i, x in enumerate(batches):
        ours, opt, since, _ = step.train_step(ours, opt, since, {"k": 7, "lr": 0.01, "l1": 0.0}, True,
                                              {"x": jnp.asarray(x), "w": jnp.ones(32)}, i,
                                              cfg=run_cfg, max_k=7)
    want = _torch_paper_steps(params, batches, k=7, lr=0.01, momentum=0.9)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    assert not np.allclose(ours["dec_bias"], params["dec_bias"])  # the steps moved it


def test_init_std_draws_every_parameter_from_a_scaled_normal():
    params = models.family(ImageModel("mlp", hidden=400, init_std=0.01)).init(jax.random.key(0))
    for leaf in jax.tree.leaves(params):  # untied: enc and dec weights and biases
        a = np.asarray(leaf)
        assert abs(a.std() - 0.01) < 0.0015 and abs(a.mean()) < 0.002 and (a != 0).all()
    torch_like = models.family(ImageModel("mlp", hidden=400)).init(jax.random.key(0))
    assert np.abs(torch_like["enc"]["weight"]).max() <= 1 / 784 ** 0.5  # PyTorch's bound


def test_half_sse_is_half_the_summed_error_and_relu_codes_are_nonnegative(images):
    family = models.family(PAPER_MODEL)
    params = family.init(jax.random.key(1))
    x = jnp.asarray(images[:16], jnp.float32) / 255
    out = family.forward(params, x, jnp.ones(16), {"k": 5}, 5)
    err = np.square(np.asarray(out.recon - x)).reshape(16, -1)
    np.testing.assert_allclose(out.rec, 0.5 * err.sum(1).mean(), rtol=1e-5)
    np.testing.assert_allclose(out.mse, err.mean(), rtol=1e-5)
    assert (np.asarray(out.code) >= 0).all() and ((np.asarray(out.code) > 0).sum(1) <= 5).all()
    usage = np.asarray(family.usage(out, {"k": 5}, 5))
    assert usage.sum() == (np.asarray(out.code) > 0).sum()  # a zero is not a use


def _paper_config(argv):
    parser = flags.make_parser("paper_table", "", paper_table.GROUPS, paper_table.PRESET)
    return paper_table.sweep_config(paper_table.settings(flags.parse(parser, argv)), None)


def test_the_recipe_fills_only_what_the_user_left_unset():
    cfg = _paper_config(["--recipe", "paper", "--lr", "0.02"])
    o = cfg.optim
    assert (o.optimizer, o.momentum, o.lr, cfg.batch_size, cfg.model.loss) == \
        ("sgd", 0.9, 0.02, 128, "half_sse")
    assert cfg.model.init_std == 0.01 and cfg.model.activation == "relu" and o.k_start is None
    assert cfg.model.tied and cfg.model.l1 == 0.0 and cfg.epochs == 30
    default = _paper_config([])
    o = default.optim
    assert (o.optimizer, o.lr, default.batch_size, default.model.loss) == ("adam", 1e-3, 100, "mse")
    assert (o.k_start, o.k_anneal_frac, default.ks) == (100, 0.5, (10, 25, 40, 70))
    record = image_recipes.record("paper", cfg)
    assert record["recipe"] == "paper" and record["momentum"] == 0.9 and record["lr"] == 0.02
    with pytest.raises(flags.UsageError, match="--momentum applies"):
        _paper_config(["--momentum", "0.5"])
    assert _paper_config(["--steps", "7"]).steps == 7  # the preset's epochs give way


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "paper", "--steps", "2"], "exist only for arch 'mlp'"),
    (["--arch", "mlp", "--optimizer", "adam", "--momentum", "0.5", "--steps", "2"],
     "--momentum applies to optimizer 'sgd'"),
])
def test_ksweep_refuses_a_recipe_it_cannot_apply(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: image_run.main(argv + ["--out", str(tmp_path / "x")]), "ksweep")
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


TINY = ("--dataset", "mnist-sample", "--train-limit", "400", "--ks", "5", "10", "--hidden", "64",
        "--recipe", "paper", "--cls-epochs", "2", "--no-progress")


def _table(tmp_path, name, *extra):
    out = tmp_path / name
    paper_table.main([*TINY, "--out", str(out), *extra])
    return out, json.loads((out / "table.json").read_text())


CURVE = ("--epochs", "2", "--curve-epochs", "1")


@pytest.fixture(scope="module")
def curve_table(tmp_path_factory):
    """A 2-epoch paper-recipe table with a curve point after epoch 1."""
    return _table(tmp_path_factory.mktemp("curve"), "long", *CURVE)


def test_a_curve_point_is_the_run_of_that_budget(tmp_path, curve_table):
    """Constant lr and fixed k: the snapshot after epoch 1 of a 2-epoch run is the 1-epoch
    run, so its classifiers and dead units are that run's."""
    out, long = curve_table
    _, short = _table(tmp_path, "short", "--epochs", "1")
    curve = long["curve"]
    assert curve["epochs"] == [1, 2] and curve["ks"] == [5, 10]
    rows = short["rows"][1:3]
    assert curve["val_error_pct"][0] == [r["val_error_pct"] for r in rows]
    assert curve["test_error_pct"][0] == [r["test_error_pct"] for r in rows]
    assert curve["dead_units_pct"][0] == [r["dead_units_pct"] for r in rows]
    assert curve["val_error_pct"][1] == [r["val_error_pct"] for r in long["rows"][1:3]]
    assert long["recipe"]["recipe"] == "paper" and long["config"]["optim"]["optimizer"] == "sgd"
    assert (out / "error_vs_epochs.png").read_bytes()[:4] == b"\x89PNG"
    assert "Learning curve" in (out / "table.md").read_text()
    fig = tmp_path / "curves.png"
    drawn = paper_table.curves([f"paper={out}"], fig)
    assert drawn["paper"] == curve and fig.read_bytes()[:4] == b"\x89PNG"
    assert json.loads(fig.with_suffix(".json").read_text())["curves"]["paper"] == curve
    with pytest.raises(flags.UsageError, match="no learning curve"):
        paper_table.curves([str(tmp_path / "short")], fig)


def test_a_stopped_paper_table_resumes_to_the_same_autoencoders_and_curve(tmp_path, curve_table):
    """Killed right after its first checkpoint (epoch 1), then continued with --resume: the
    same autoencoders, bit for bit, and the same learning curve (epoch 1's snapshot was kept
    on disk before the checkpoint)."""
    ref_out, ref = curve_table
    stopped = tmp_path / "stopped"
    died = subprocess.run([sys.executable, str(ROOT / "tests" / "stopped_run.py"),
                           "experiments.paper_table", *TINY, "--out", str(stopped), *CURVE],
                          cwd=ROOT, capture_output=True, text=True)
    assert died.returncode == 75, died.stderr
    assert [p.name for p in (stopped / "snapshots").iterdir()] == ["epoch_1.pkl"]
    paper_table.main([*TINY, "--resume", str(stopped), *CURVE])
    resumed = json.loads((stopped / "table.json").read_text())
    for a, b in zip(jax.tree.leaves(formats.load_params_file(ref_out / "params.pkl")["params"]),
                    jax.tree.leaves(formats.load_params_file(stopped / "params.pkl")["params"])):
        np.testing.assert_array_equal(a, b)
    assert resumed["curve"] == ref["curve"] and resumed["curve"]["epochs"] == [1, 2]


def test_curve_epochs_must_fall_below_the_budget(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: paper_table.main(["--dataset", "mnist-sample", "--epochs", "2",
                                          "--curve-epochs", "2", "--out", str(tmp_path / "x")]),
                "paper_table")
    assert e.value.code == 2 and "--curve-epochs" in capsys.readouterr().err
