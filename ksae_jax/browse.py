"""Static HTML reports of what an SAE's latents (or an image autoencoder's code units) do:
one self-contained page per model (no server, no external assets) with the firing-density
histogram, a table of every latent (frequency, mean activation), and for a sample of latents
(the most frequent, and a random pick in every decile of frequency) their top-activating
held-out examples: images beside the latent's decoder image, or text contexts with each
token shaded by the latent's activation. Dead latents are listed, not drawn.

`ksae browse RUN` (`write`) reads a run folder: its models, and the held-out examples its
metrics.json names (test images; vectors of an image classifier or an LM cache, with their
images or text contexts).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from ksae_jax import inference
from ksae_jax.data import images as image_data
from ksae_jax.data import vectors
from ksae_jax.files import write_bytes
from ksae_jax.flags import UsageError

TOP_EXAMPLES = 8
N_FREQUENT, PER_DECILE = 12, 2
CONTEXT_LEFT, CONTEXT_RIGHT = 10, 4


@dataclasses.dataclass(frozen=True)
class BrowseConfig:
    """Pages of a run's features."""

    run: Path
    """A run folder (params.pkl and metrics.json)."""
    out: Path | None = None
    """Report folder (None: RUN/browse)."""
    max_rows: int = 65_536
    """Held-out rows scanned for examples."""
    seed: int = 0
    """Which latents are sampled."""

    positional: ClassVar[tuple] = ("run",)

CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{padding:2px 8px;text-align:right}
th{background:#eee}tr:nth-child(even){background:#f7f7f7}
.latent{border:1px solid #ccc;border-radius:6px;margin:1em 0;padding:.6em}
.latent h3{margin:.2em 0;font-size:15px}.examples{display:flex;flex-wrap:wrap;gap:6px}
img.px{image-rendering:pixelated;width:84px;height:84px;border:1px solid #ddd}
.ctx{font-family:monospace;font-size:13px;margin:2px 0;white-space:pre-wrap}
.tok{border-radius:3px}.fire{outline:2px solid #c00}
.dead{font-family:monospace;font-size:11px;color:#666}figure{margin:0;text-align:center}
figcaption{font-size:11px}"""


class LatentStats(NamedTuple):
    counts: np.ndarray      # (n,) rows on which each latent fires
    means: np.ndarray       # (n,) mean activation where it fires (0 when dead)
    top_values: np.ndarray  # (n, TOP_EXAMPLES) largest activations, descending
    top_rows: np.ndarray    # (n, TOP_EXAMPLES) the rows they came from (-1: none)
    n_rows: int


def latent_stats(encode: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                 chunk: int = 2048, top: int = TOP_EXAMPLES) -> LatentStats:
    """Firing counts, mean activations and the top-activating rows of every latent, from
    dense codes encode(x_chunk) (chunk, n), one chunk at a time."""
    counts = sums = best_v = best_r = None
    for start in range(0, len(x), chunk):
        codes = np.asarray(encode(x[start:start + chunk]), np.float32)
        if counts is None:
            n = codes.shape[1]
            counts, sums = np.zeros(n), np.zeros(n)
            best_v, best_r = np.full((top, n), -np.inf, np.float32), np.full((top, n), -1)
        counts += (codes > 0).sum(0)
        sums += codes.sum(0)
        rows = np.arange(start, start + len(codes))[:, None] * np.ones(codes.shape[1], int)
        v, r = np.concatenate([best_v, codes]), np.concatenate([best_r, rows])
        pick = np.argpartition(-v, top - 1, axis=0)[:top]
        v, r = np.take_along_axis(v, pick, 0), np.take_along_axis(r, pick, 0)
        order = np.argsort(-v, axis=0, kind="stable")
        best_v, best_r = np.take_along_axis(v, order, 0), np.take_along_axis(r, order, 0)
    best_r = np.where(best_v > 0, best_r, -1)
    means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return LatentStats(counts, means, best_v.T, best_r.T, len(x))


def sample_latents(counts: np.ndarray, seed: int = 0) -> list[int]:
    """The most frequent latents, then PER_DECILE random ones from each decile of frequency
    among the latents that fire."""
    alive = np.flatnonzero(counts > 0)
    order = alive[np.argsort(-counts[alive], kind="stable")]
    chosen = list(order[:N_FREQUENT])
    rng = np.random.default_rng(seed)
    for decile in np.array_split(order[N_FREQUENT:], 10):
        if len(decile):
            chosen += list(rng.choice(decile, min(PER_DECILE, len(decile)), replace=False))
    return [int(i) for i in chosen]


def density_svg(counts: np.ndarray, n_rows: int, bins: int = 30) -> str:
    """Histogram of log10 firing frequency as inline SVG (dead latents counted apart)."""
    freq = counts / max(n_rows, 1)
    alive = np.log10(freq[freq > 0])
    lo = min(-float(np.log10(max(n_rows, 1))), float(alive.min()) if len(alive) else -1)
    hist, edges = np.histogram(alive, bins=bins, range=(lo, 0.0))
    w, h, pad = 600, 220, 30
    scale = (h - 2 * pad) / max(hist.max(), 1)
    bar = (w - 2 * pad) / bins
    rects = "".join(f'<rect x="{pad + i * bar:.1f}" y="{h - pad - c * scale:.1f}" width="{bar - 1:.1f}" '
                    f'height="{c * scale:.1f}" fill="#3b7dd8"><title>{c} latents, 10^{edges[i]:.2f}'
                    f"..10^{edges[i + 1]:.2f}</title></rect>" for i, c in enumerate(hist))
    ticks = "".join(f'<text x="{pad + (t - lo) / -lo * (w - 2 * pad):.1f}" y="{h - 8}" '
                    f'font-size="11" text-anchor="middle">1e{t}</text>'
                    for t in range(int(np.ceil(lo)), 1))
    dead = int((counts == 0).sum())
    return (f'<svg class="density" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">'
            f'<text x="{pad}" y="16" font-size="12">log10 firing frequency of the {len(alive)} '
            f'latents that fire ({dead} dead)</text>{rects}{ticks}</svg>')


def png_data_uri(image: np.ndarray, signed: bool = False) -> str:
    """A grey (or, signed, blue-white-red) PNG of a 2-D array, as a data: URI."""
    from matplotlib import image as mpimg

    buf = io.BytesIO()
    if signed:
        lim = float(np.abs(image).max()) or 1.0
        mpimg.imsave(buf, image, cmap="RdBu_r", vmin=-lim, vmax=lim, format="png")
    else:
        mpimg.imsave(buf, image, cmap="gray", vmin=0.0, vmax=1.0, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_panel(images: np.ndarray, rows: np.ndarray, values: np.ndarray,
                decoder_image: np.ndarray | None) -> str:
    """The top-activating images of one latent, its decoder image first."""
    cells = []
    if decoder_image is not None:
        cells.append(f'<figure><img class="px" src="{png_data_uri(decoder_image, signed=True)}" '
                     'alt="decoder"><figcaption>decoder</figcaption></figure>')
    for r, v in zip(rows, values):
        if r >= 0:
            cells.append(f'<figure><img class="px" src="{png_data_uri(images[r] / 255.0)}" '
                         f'alt="row {r}"><figcaption>{v:.3g}</figcaption></figure>')
    return f'<div class="examples">{"".join(cells)}</div>'


def text_panel(tokens: list[list[str]], acts: list[np.ndarray], fire: list[int]) -> str:
    """Text contexts of one latent: each token shaded by the latent's activation there, the
    firing token outlined."""
    lines = []
    for toks, a, f in zip(tokens, acts, fire):
        top = float(a.max()) or 1.0
        spans = "".join(
            f'<span class="tok{" fire" if i == f else ""}" title="{v:.3g}" style="background:'
            f'rgba(220,60,30,{max(v, 0) / top:.2f})">{html.escape(t)}</span>'
            for i, (t, v) in enumerate(zip(toks, a)))
        lines.append(f'<div class="ctx">{spans}</div>')
    return "".join(lines)


def page(title: str, summary: str, stats: LatentStats, panels: dict[int, str]) -> str:
    """One model's report."""
    freq = stats.counts / max(stats.n_rows, 1)
    order = np.argsort(-stats.counts, kind="stable")
    table = "".join(f"<tr><td>{i}</td><td>{int(stats.counts[i])}</td><td>{freq[i]:.2e}</td>"
                    f"<td>{stats.means[i]:.3g}</td></tr>" for i in order if stats.counts[i] > 0)
    dead = np.flatnonzero(stats.counts == 0)
    sections = "".join(
        f'<div class="latent" id="latent-{i}"><h3>latent {i}: fires on {int(stats.counts[i])} '
        f"rows ({freq[i]:.2e}), mean activation {stats.means[i]:.3g}</h3>{body}</div>"
        for i, body in panels.items())
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>{summary}</p>"
            f"{density_svg(stats.counts, stats.n_rows)}<h2>Sampled latents</h2>{sections}"
            f"<h2>Dead latents ({len(dead)})</h2><p class=\"dead\">"
            f"{' '.join(map(str, dead)) or 'none'}</p><h2>Every latent that fires</h2>"
            "<details><summary>table (sorted by frequency)</summary><table><tr><th>latent</th>"
            f"<th>rows</th><th>frequency</th><th>mean activation</th></tr>{table}</table>"
            "</details></body></html>")


def index(title: str, entries: list[tuple[str, str, str]]) -> str:
    """The report's front page: one link per model page, (file, name, one-line summary)."""
    items = "".join(f'<li><a href="{f}">{html.escape(name)}</a>: {summary}</li>'
                    for f, name, summary in entries)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
            f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><ul>{items}"
            "</ul></body></html>")


# ---------------------------------------------------------------- a run folder's pages

def load_run(run: Path):
    """(models, metrics) of a run folder; one line and exit 2 for anything missing."""
    if not (run / "params.pkl").is_file() or not (run / "metrics.json").is_file():
        raise UsageError(f"{run}: not a run folder (params.pkl and metrics.json expected)")
    return inference.load(run / "params.pkl"), json.loads((run / "metrics.json").read_text())


class Examples:
    """Held-out rows of a run and how to show one of them."""

    def __init__(self, x, images=None, windows=None, tokenizer=None):
        self.x, self.images, self.windows, self.tokenizer = x, images, windows, tokenizer


def image_examples(metrics: dict, limit: int) -> Examples:
    source = Path(metrics.get("data_source", ""))
    ds = image_data.load(metrics["dataset"] if not source.is_dir() else "mnist",
                         source if source.is_dir() else None)
    return Examples(ds.x_test[:limit], images=ds.x_test[:limit])


def vector_examples(metrics: dict, limit: int) -> Examples:
    """The held-out vectors of an SAE run, with images or token windows when known."""
    info = metrics.get("data") or {}
    if not info.get("data"):
        raise UsageError("metrics.json does not say which data the run used")
    data = Path(info["data"])
    held = Path(info["eval_data"]) if info.get("eval_data") else None
    split = vectors.split(vectors.open_vectors(data, scan=False),
                          None if held is None else vectors.open_vectors(held, scan=False),
                          info.get("eval_frac", 0.05))
    x = split.eval.read(0, min(limit, split.eval.n))
    folder = (held or data).parent if (held or data).is_dir() else (held or data).parent
    meta, acts_info = folder / "meta.json", folder / "info.json"
    if meta.is_file() and (folder / "heldout_windows.npy").is_file():
        from transformers import AutoTokenizer
        m = json.loads(meta.read_text())
        return Examples(x, windows=np.load(folder / "heldout_windows.npy"),
                        tokenizer=AutoTokenizer.from_pretrained(m["tokenizer"]["name_or_path"]))
    if acts_info.is_file() and held is not None and held.name == "test.npy":
        source = Path(json.loads(acts_info.read_text()).get("source", ""))
        if source.is_dir():
            return Examples(x, images=image_data.load("mnist", source).x_test[:len(x)])
    if x.shape[1] == 28 * 28:  # the vectors are images
        return Examples(x, images=np.clip(x.reshape(-1, 28, 28) * 255, 0, 255))
    return Examples(x)


def text_contexts(model, label, ex: Examples, latent: int, rows: np.ndarray) -> str:
    per = ex.windows.shape[1] - 1
    toks, acts, fire = [], [], []
    for r in rows[rows >= 0]:
        w, pos = divmod(int(r), per)
        lo, hi = max(0, pos - CONTEXT_LEFT), min(per, pos + CONTEXT_RIGHT + 1)
        window_rows = ex.x[w * per:(w + 1) * per]
        if len(window_rows) < hi:
            continue
        codes = model.encode(window_rows[lo:hi], label)[:, latent]
        ids = ex.windows[w, 1 + lo:1 + hi]
        toks.append([ex.tokenizer.decode([int(t)]) for t in ids])
        acts.append(codes)
        fire.append(pos - lo)
    return text_panel(toks, acts, fire)


def decoder_image(model, label, latent: int):
    if hasattr(model, "decoder_features"):  # image autoencoders: what the unit draws alone
        code = np.zeros((1, model.model_config.hidden), np.float32)
        code[0, latent] = 1.0
        return model.decode(code, label)[0] - model.decode(code * 0, label)[0]
    W = model.decoder_directions(label)
    return W[latent].reshape(28, 28) if W.shape[1] == 28 * 28 else None


def model_page(model, label, ex: Examples, title: str, seed: int) -> tuple[str, str]:
    stats = latent_stats(lambda x: model.encode(x, label), ex.x)
    panels = {}
    for latent in sample_latents(stats.counts, seed):
        rows, values = stats.top_rows[latent], stats.top_values[latent]
        if ex.windows is not None:
            panels[latent] = text_contexts(model, label, ex, latent, rows)
        elif ex.images is not None:
            panels[latent] = image_panel(ex.images, rows, values,
                                                decoder_image(model, label, latent))
        else:
            panels[latent] = "<p>top rows: " + ", ".join(
                f"{r} ({v:.3g})" for r, v in zip(rows, values) if r >= 0) + "</p>"
    dead = int((stats.counts == 0).sum())
    summary = (f"{len(stats.counts):,} latents, {dead:,} dead on {stats.n_rows:,} held-out rows; "
               f"mean L0 {stats.counts.sum() / max(stats.n_rows, 1):.2f}")
    return page(title, summary, stats, panels), summary


def write(cfg: BrowseConfig) -> Path:
    """`ksae browse`: the pages of a run folder's models and their index."""
    model, metrics = load_run(cfg.run)
    try:
        ex = (image_examples if "dataset" in metrics and "data" not in metrics
              else vector_examples)(metrics, cfg.max_rows)
    except (image_data.DataError, image_data.DatasetUnavailable) as e:
        raise UsageError(f"the run's data: {e}") from None
    out = cfg.out or cfg.run / "browse"
    out.mkdir(parents=True, exist_ok=True)
    name, entries = model.label_name, []
    for label in model.labels:
        title = f"{model.model_config.arch} model, {name} = {label}"
        text, summary = model_page(model, label, ex, title, cfg.seed)
        file = f"{name}{label}.html"
        write_bytes(out / file, text.encode())
        entries.append((file, title, summary))
    write_bytes(out / "index.html", index(f"Features of {cfg.run}", entries).encode())
    print(f"wrote {len(entries)} pages and index.html to {out}")
    return out
