"""The paper-table experiment end to end on a tiny config."""
import json

import numpy as np

from experiments import paper_table


def test_tiny_paper_table_writes_every_output(tmp_path):
    out = tmp_path / "table"
    paper_table.main(["--dataset", "mnist-sample", "--train-limit", "400", "--ks", "5", "10",
                      "--hidden", "64", "--epochs", "2", "--k-start", "30", "--cls-epochs", "2",
                      "--finetune", "--ft-epochs", "1", "--batch-size", "100", "--no-progress",
                      "--out", str(out)])
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
    assert t["choices"]["n_active"] == [15, 30] and t["config"]["k_start"] == 30
    assert (t["n_train"], t["n_val"]) == (334, 66)  # a sixth of the 400 held out
    assert {k: t["config"]["model"][k] for k in ("arch", "hidden", "tied", "loss")} == \
        {"arch": "mlp", "hidden": 64, "tied": True, "loss": "mse"}
    md = (out / "table.md").read_text()
    assert "| k = 10 fine-tuned |" in md and "| raw pixels |" in md and "validation error %" in md
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
