"""ksae browse: self-contained HTML pages of a run's features (the structure, checked
by parsing; benchmarks/browse_check.py opens them in headless Chromium)."""
import json
from html.parser import HTMLParser

import numpy as np
import pytest

from ksae_jax import browse as pages
from ksae_jax import cli, image_run, sae_run


def browse(argv):
    return cli.browse(argv, "ksae browse")


class Tally(HTMLParser):
    """Counts what a page is made of, and every external reference."""

    def __init__(self):
        super().__init__()
        self.classes, self.tags, self.external = {}, {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for c in (attrs.get("class") or "").split():
            self.classes[c] = self.classes.get(c, 0) + 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value.startswith(("http:", "https:", "//")):
                self.external.append(value)


def tally(path) -> Tally:
    t = Tally()
    t.feed(path.read_text())
    return t


def test_image_run_pages(tmp_path):
    run = tmp_path / "run"
    image_run.main(["--dataset", "mnist-sample", "--train-limit", "300", "--arch", "mlp", "--hidden", "48",
                 "--ks", "3", "8", "--steps", "6", "--batch-size", "100", "--no-progress",
                 "--out", str(run)])
    browse([str(run), "--max-rows", "400"])
    out = run / "browse"
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "k3.html", "k8.html"]
    index = tally(out / "index.html")
    assert index.tags["a"] == 2 and not index.external
    t = tally(out / "k8.html")
    assert t.tags["svg"] == 1 and t.classes["latent"] >= 5 and not t.external
    assert t.classes["px"] > t.classes["latent"]  # decoder image + top images per latent
    text = (out / "k8.html").read_text()
    assert text.count("data:image/png;base64,") == t.classes["px"]
    assert "Dead latents" in text and "Every latent that fires" in text


def test_vector_run_pages_list_dead_latents_without_panels(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((3000, 12)).astype(np.float32))
    run = tmp_path / "run"
    sae_run.main(["--data", str(tmp_path / "x.npy"), "--latents", "96", "--ks", "2", "--steps", "3",
                  "--batch-size", "256", "--no-progress", "--out", str(run)])
    browse([str(run)])
    html = (run / "browse" / "k2.html").read_text()
    m = json.loads((run / "metrics.json").read_text())
    dead = round(m["dead_frac"][0] * 96)
    assert f"Dead latents ({dead})" in html
    t = tally(run / "browse" / "k2.html")
    alive = 96 - dead
    assert min(alive, pages.N_FREQUENT) <= t.classes["latent"] <= pages.N_FREQUENT + 10 * pages.PER_DECILE
    assert text_rows(html) == alive  # the table lists every latent that fires, and only those


def text_rows(html: str) -> int:
    return html.split("<table>")[1].count("<tr>") - 1


def test_latent_stats_against_a_direct_computation():
    rng = np.random.default_rng(1)
    codes = np.maximum(rng.standard_normal((500, 7)) - 1, 0).astype(np.float32)
    codes[:, 3] = 0  # a dead latent
    s = pages.latent_stats(lambda x: x, codes, chunk=128, top=4)
    np.testing.assert_array_equal(s.counts, (codes > 0).sum(0))
    for j in range(7):
        want = np.argsort(-codes[:, j], kind="stable")[:4]
        got = s.top_rows[j][s.top_rows[j] >= 0]
        np.testing.assert_array_equal(got, want[codes[want, j] > 0])
    assert (s.top_rows[3] == -1).all() and s.means[3] == 0
    chosen = pages.sample_latents(s.counts)
    assert 3 not in chosen and len(set(chosen)) == len(chosen) == 6


def test_not_a_run_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: browse([str(tmp_path)]), "ksae browse")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a run folder" in err and err.count("\n") == 1
