"""Figures (matplotlib, no display needed): reconstructions, loss curves and decoder features
of the image models; FVU, dead latents and firing frequencies of the vector SAEs."""
from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ksae_jax.files import write_bytes


def save(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> None:
    """Writes a PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def _mosaic(rows, scale: str, gap: int) -> tuple[np.ndarray, int]:
    """(the images of `rows` tiled into one array on [0, 1], NaN between the tiles and past
    the end of a short row; the tiles' height); "each" stretches every image to its range."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    h, w = next(np.shape(img) for r in rows for img in r)
    out = np.full((n_rows * (h + gap) - gap, n_cols * (w + gap) - gap), np.nan)
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            img = np.asarray(img, np.float64)
            if scale == "each":
                lo, hi = img.min(), img.max()
                img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
            out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    return out, h


def image_rows(rows, row_labels, title: str = "", scale: str = "fixed", gap: int = 3) -> Figure:
    """A grid of same-sized images, one labelled row per array in `rows`, drawn as one tiled
    image (one Axes: a figure of hundreds of panels renders in a fraction of a second).

    scale: "fixed" shows pixels on [0, 1]; "each" stretches every image to its own range.
    """
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(1.1 * n_cols + 1.2, 1.1 * n_rows + (0.5 if title else 0.1)),
                 layout="compressed")
    ax = fig.subplots()
    tiles, h = _mosaic(rows, scale, gap)
    ax.imshow(tiles, cmap=colormaps["gray"].with_extremes(bad="white"), vmin=0.0, vmax=1.0,
              interpolation="nearest")
    ax.set_axis_off()
    for r, label in enumerate(row_labels):
        ax.text(-2 * gap, r * (h + gap) + h / 2, label, ha="right", va="center", fontsize=10)
    if title:
        fig.suptitle(title)
    return fig


def reconstructions(originals, recons, title: str) -> Figure:
    """Originals above their reconstructions (the original README's figures)."""
    return image_rows([originals, np.clip(recons, 0, 1)], ["input", "output"], title)


def compare_ks(originals, recons_by_k: dict, title: str = "") -> Figure:
    """The same test images reconstructed by every k, one row per k."""
    rows = [originals] + [np.clip(r, 0, 1) for r in recons_by_k.values()]
    labels = ["input"] + [f"k = {k}" for k in recons_by_k]
    return image_rows(rows, labels, title)


def feature_grid(features, title: str, n_cols: int = 10) -> Figure:
    """Decoder features (n, 28, 28), each stretched to its own range, n_cols per row."""
    features = np.asarray(features)
    rows = [features[i:i + n_cols] for i in range(0, len(features), n_cols)]
    fig = image_rows(rows, [""] * len(rows), title, scale="each")
    return fig


def feature_panels(features_by_k: dict, title: str = "", n_cols: int = 10) -> Figure:
    """One grid of decoder features per k, side by side (the paper's filter pictures)."""
    n = len(features_by_k)
    n_rows = max(-(-len(f) // n_cols) for f in features_by_k.values())
    fig = Figure(figsize=(n * (0.5 * n_cols + 0.3), 0.5 * n_rows + 0.8), layout="compressed")
    for sub, (k, feats) in zip(np.atleast_1d(fig.subfigures(1, n)), features_by_k.items()):
        axes = sub.subplots(n_rows, n_cols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < len(feats):
                ax.imshow(feats[i], cmap="gray")
        sub.suptitle(f"k = {k}")
    if title:
        fig.suptitle(title)
    return fig


def _per_k_panels(ks, steps, left, right, labels: tuple[str, str], title: str, log_right=True):
    """Two panels of one line per k against the step (training curves)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for k, a, b in zip(ks, left, right):
        axes[0].plot(steps, a, marker="o", ms=3, label=f"k = {k}")
        axes[1].plot(steps, b, marker="o", ms=3, label=f"k = {k}")
    for ax, name, log in zip(axes, labels, (True, log_right)):
        ax.set(xlabel="step", ylabel=name, yscale="log" if log else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def loss_curves(ks, steps, train_loss, test_mse, title: str = "") -> Figure:
    """Train loss (MSE + L1) and test MSE at every evaluation step, one line per k."""
    return _per_k_panels(ks, steps, train_loss, test_mse, ("train loss (MSE + L1)", "test MSE"), title)


# ---------------------------------------------------------------- TopK SAEs on vectors

def fvu_vs_k(ks, fvu, dead_frac, title: str = "", baseline: dict | None = None,
             name: str = "k") -> Figure:
    """Held-out FVU against k (log-log; or another per-model value `name`, e.g. JumpReLU's
    L0 coefficient), with the dead-latent percentage beside it.
    baseline: optional {label: (ks, fvu)} drawn as dashed lines (e.g. a run without AuxK)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_fvu, ax_dead = fig.subplots(1, 2)
    ax_fvu.plot(ks, fvu, marker="o", label="this run")
    for label, (bks, bfvu) in (baseline or {}).items():
        ax_fvu.plot(bks, bfvu, marker="s", ls="--", label=label)
    ax_fvu.set(xscale="log" if min(ks) > 0 else "linear", yscale="log", xlabel=name,
               ylabel="held-out FVU")
    ax_fvu.set_xticks(list(ks), [str(k) for k in ks])
    ax_fvu.set_xticks([], minor=True)  # no "2 x 10^1" labels among the ks
    ax_fvu.grid(alpha=0.3, which="both")
    ax_fvu.legend(fontsize=8)
    ax_dead.bar([str(k) for k in ks], 100 * np.asarray(dead_frac))
    ax_dead.set(xlabel=name, ylabel="dead latents % (never fire on the held-out set)")
    ax_dead.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title)
    return fig


def firing_histograms(ks, counts, n_rows: int, title: str = "") -> Figure:
    """Histogram of log10 firing frequency of the latents, one panel per k (dead latents are
    counted apart, at the left edge)."""
    fig = Figure(figsize=(3 * len(ks) + 1, 3), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ks), sharey=True))
    for ax, k, c in zip(axes, ks, counts):
        freq = np.asarray(c) / n_rows
        alive = freq[freq > 0]
        ax.hist(np.log10(alive), bins=40, color="C0")
        ax.set(title=f"k = {k}  ({int((freq == 0).sum())} dead)", xlabel="log10 firing frequency")
    axes[0].set_ylabel("latents")
    if title:
        fig.suptitle(title)
    return fig


def training_curves(ks, steps, train_rec, window_dead, title: str = "") -> Figure:
    """Training FVU and the percentage of latents dead by the training window, per k."""
    dead = [100 * np.asarray(d, float) for d in window_dead]
    return _per_k_panels(ks, steps, train_rec, dead,
                         ("training FVU", "dead latents % (training window)"), title, log_right=False)


def recovery_vs_k(ks, mmcs, recovered, dead_frac, title: str = "") -> Figure:
    """Synthetic ground truth: MMCS, the fraction of features recovered and dead latents, per k."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    labels = [str(k) for k in ks]
    ax.plot(labels, mmcs, marker="o", label="MMCS")
    ax.plot(labels, recovered, marker="s", label="features recovered (cos >= 0.9)")
    ax.plot(labels, dead_frac, marker="^", label="dead latents")
    ax.set(xlabel="k", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def frontier(panels: dict, title: str = "") -> Figure:
    """Held-out FVU against L0 (log-log): one panel per data set, {panel: {label: (l0s,
    fvus)}}; each label (a system or family) is a line of points, lower-left is better."""
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, series) in zip(axes, panels.items()):
        for i, (label, (l0, fvu)) in enumerate(series.items()):
            order = np.argsort(l0)
            ax.plot(np.asarray(l0)[order], np.asarray(fvu)[order], marker="osD^v"[i % 5],
                    ls="-" if i == 0 else "--", label=label)
        ax.set(xscale="log", yscale="log", xlabel="L0 (latents per vector)",
               ylabel="held-out FVU", title=name)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- the paper's table

def error_curves(curves: dict, dataset: str, paper: dict | None = None) -> Figure:
    """Validation and test error % of the feature classifiers against the autoencoders'
    epochs (log x), one panel per k, one line style per recipe: {label: curve} with
    curve = {"ks", "epochs", "val_error_pct", "test_error_pct"} (as paper_table writes);
    paper: optional {k: the paper's test error %} drawn as dotted horizontal lines."""
    ks = sorted({k for c in curves.values() for k in c["ks"]})
    fig = Figure(figsize=(3.2 * len(ks), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(ks), sharey=True))
    for ax, k in zip(axes, ks):
        for i, (label, c) in enumerate(curves.items()):
            if k not in c["ks"]:
                continue
            j, color = c["ks"].index(k), f"C{i}"
            for name, ls, what in (("val_error_pct", "-", "validation"), ("test_error_pct", "--", "test")):
                ax.plot(c["epochs"], [row[j] for row in c[name]], ls=ls, marker="o", ms=3,
                        color=color, label=f"{label}, {what}")
        if paper and k in paper:
            ax.axhline(paper[k], color="k", ls=":", label="Makhzani & Frey (test)")
        ax.set(xscale="log", xlabel="autoencoder epochs", title=f"k = {k}")
        ticks = sorted({e for c in curves.values() for e in c["epochs"]})
        ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("classification error %")
    handles = {}
    for ax in axes:  # every line once, the paper's too (not every k has one)
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center",
               ncol=min(len(handles), 5), fontsize=8)
    fig.suptitle(f"{dataset}: k-sparse features under a linear classifier")
    return fig
