"""Static HTML reports of what an SAE's latents (or an image autoencoder's code units) do:
one self-contained page per model (no server, no external assets) with the firing-density
histogram, a table of every latent (frequency, mean activation), and for a sample of latents
(the most frequent, and a random pick in every decile of frequency) their top-activating
held-out examples: images beside the latent's decoder image, or text contexts with each
token shaded by the latent's activation. Dead latents are listed, not drawn."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

TOP_EXAMPLES = 8
N_FREQUENT, PER_DECILE = 12, 2

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
