"""The paper-table experiment end to end on a tiny config."""
import json

from experiments import paper_table


def test_tiny_paper_table_writes_every_output(tmp_path):
    out = tmp_path / "table"
    paper_table.main(["--dataset", "mnist-sample", "--train-limit", "400", "--ks", "5", "10",
                      "--hidden", "64", "--epochs", "2", "--k-start", "30", "--cls-epochs", "2",
                      "--finetune", "--ft-epochs", "1", "--batch-size", "100", "--no-progress",
                      "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"table.md", "table.json", "features.png", "params.pkl",
                                               "checkpoint.pkl"}
    t = json.loads((out / "table.json").read_text())
    names = [r["name"] for r in t["rows"]]
    assert names == ["raw pixels", "k = 5", "k = 10", "k = 5 fine-tuned", "k = 10 fine-tuned"]
    for r in t["rows"]:
        assert 0 <= r["test_error_pct"] <= 100
    for r in t["rows"][1:3]:
        assert 0 <= r["dead_units_pct"] <= 100 and 0 < r["recon_mse"] < 0.2
    assert t["n_active"] == [15, 30] and t["config"]["k_start"] == 30
    assert {k: t["config"]["model"][k] for k in ("arch", "hidden", "tied", "loss")} == \
        {"arch": "mlp", "hidden": 64, "tied": True, "loss": "mse"}
    md = (out / "table.md").read_text()
    assert "| k = 10 fine-tuned |" in md and "| raw pixels |" in md
    assert (out / "features.png").read_bytes()[:4] == b"\x89PNG"
