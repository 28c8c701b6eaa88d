"""Look at features: a static HTML report of a run's models, one page per k (or L0
coefficient), readable in any browser without a server.

    python -m experiments.browse runs/ksweep                # image autoencoders: test images
    python -m experiments.browse runs/sae_lm                # SAEs on an LM cache: text contexts

Each page has the firing-density histogram, a table of every latent that fires (frequency,
mean activation), the top-activating held-out examples of a sample of latents (the most
frequent, and random ones in every decile of frequency), and the list of dead latents. The
examples are the test images (with the latent's decoder image) for image models and for
SAEs on image vectors or on an image classifier's activations (experiments.activations),
and text contexts for SAEs on a language model's cache (experiments.lm cache).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ksae_jax import browse, cli, inference
from ksae_jax.data import images as image_data
from ksae_jax.data import vectors
from ksae_jax.files import write_bytes

CONTEXT_LEFT, CONTEXT_RIGHT = 10, 4


def parse_args(argv):
    p = cli.Parser(prog="python -m experiments.browse", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder (params.pkl and metrics.json)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default RUN/browse)")
    p.add_argument("--max-rows", type=cli.positive_int, default=65_536,
                   help="held-out rows scanned for examples (default 65,536)")
    p.add_argument("--seed", type=cli.int_value, default=0, help="which latents are sampled")
    return p.parse_args(argv)


def load_run(run: Path):
    """(models, metrics) of a run folder; one line and exit 2 for anything missing."""
    if not (run / "params.pkl").is_file() or not (run / "metrics.json").is_file():
        raise cli.UsageError(f"{run}: not a run folder (params.pkl and metrics.json expected)")
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
        raise cli.UsageError("metrics.json does not say which data the run used")
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
    return browse.text_panel(toks, acts, fire)


def decoder_image(model, label, latent: int):
    if hasattr(model, "decoder_features"):  # image autoencoders: what the unit draws alone
        code = np.zeros((1, model.model_config.hidden), np.float32)
        code[0, latent] = 1.0
        return model.decode(code, label)[0] - model.decode(code * 0, label)[0]
    W = model.decoder_directions(label)
    return W[latent].reshape(28, 28) if W.shape[1] == 28 * 28 else None


def model_page(model, label, ex: Examples, title: str, seed: int) -> tuple[str, str]:
    stats = browse.latent_stats(lambda x: model.encode(x, label), ex.x)
    panels = {}
    for latent in browse.sample_latents(stats.counts, seed):
        rows, values = stats.top_rows[latent], stats.top_values[latent]
        if ex.windows is not None:
            panels[latent] = text_contexts(model, label, ex, latent, rows)
        elif ex.images is not None:
            panels[latent] = browse.image_panel(ex.images, rows, values,
                                                decoder_image(model, label, latent))
        else:
            panels[latent] = "<p>top rows: " + ", ".join(
                f"{r} ({v:.3g})" for r, v in zip(rows, values) if r >= 0) + "</p>"
    dead = int((stats.counts == 0).sum())
    summary = (f"{len(stats.counts):,} latents, {dead:,} dead on {stats.n_rows:,} held-out rows; "
               f"mean L0 {stats.counts.sum() / max(stats.n_rows, 1):.2f}")
    return browse.page(title, summary, stats, panels), summary


def main(argv=None):
    args = parse_args(argv)
    model, metrics = load_run(args.run)
    try:
        ex = (image_examples if "dataset" in metrics and "data" not in metrics
              else vector_examples)(metrics, args.max_rows)
    except (image_data.DataError, image_data.DatasetUnavailable) as e:
        raise cli.UsageError(f"the run's data: {e}") from None
    out = args.out or args.run / "browse"
    out.mkdir(parents=True, exist_ok=True)
    name, entries = model.config.label_name, []
    for label in model.labels:
        title = f"{model.model_config.arch} model, {name} = {label}"
        text, summary = model_page(model, label, ex, title, args.seed)
        file = f"{name}{label}.html"
        write_bytes(out / file, text.encode())
        entries.append((file, title, summary))
    write_bytes(out / "index.html", browse.index(f"Features of {args.run}", entries).encode())
    print(f"wrote {len(entries)} pages and index.html to {out}")


if __name__ == "__main__":
    cli.run(main)
