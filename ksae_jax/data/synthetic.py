"""Vectors with known features, to check that a sparse autoencoder recovers them (Sharkey et
al. 2022): G unit feature directions in d dimensions; feature i fires with probability
proportional to decay^i, scaled so that on average `mean_active` fire per vector, with a
magnitude uniform on [0, 1]; x = sum of the active features' magnitudes times directions,
plus optional Gaussian noise. The correlated variant draws the firing events through a
Gaussian copula (correlated normals thresholded at each feature's probability)."""
from __future__ import annotations

import dataclasses
from statistics import NormalDist
from typing import NamedTuple

import numpy as np


class Synthetic(NamedTuple):
    x: np.ndarray         # (N, d) float32
    features: np.ndarray  # (G, d) unit rows: the ground truth
    probs: np.ndarray     # (G,) firing probabilities


def firing_probs(n_features: int, mean_active: float, decay: float) -> np.ndarray:
    """p_i proportional to decay^i with sum p_i = mean_active (each at most 1)."""
    p = decay ** np.arange(n_features)
    p = p * mean_active / p.sum()
    if p.max() > 1:
        raise ValueError(f"mean_active={mean_active} needs a firing probability above 1")
    return p


def generate(n: int, *, d: int = 256, n_features: int = 512, mean_active: float = 5.0,
             decay: float = 0.99, noise: float = 0.0, correlation: float = 0.0,
             seed: int = 0, chunk: int = 65536) -> Synthetic:
    """n vectors (see the module docstring). correlation in [0, 1): the share of each feature's
    latent Gaussian that comes from 8 factors shared by all features (random loadings), so
    that two features' firing correlates with coefficient correlation * cos(their loadings)."""
    if not 0 <= correlation < 1:
        raise ValueError(f"correlation must lie in [0, 1), got {correlation}")
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n_features, d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    probs = firing_probs(n_features, mean_active, decay)
    factors = None
    if correlation > 0:
        n_factors = 8
        factors = rng.standard_normal((n_features, n_factors))
        factors *= np.sqrt(correlation) / np.linalg.norm(factors, axis=1, keepdims=True)
    thresholds = np.array([NormalDist().inv_cdf(p) for p in probs])  # P(z < t_i) = p_i
    out = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if factors is None:
            fires = rng.random((m, n_features)) < probs
        else:
            shared = rng.standard_normal((m, factors.shape[1])) @ factors.T
            own = rng.standard_normal((m, n_features)) * np.sqrt(1 - correlation)
            fires = shared + own < thresholds
        coef = fires * rng.random((m, n_features))
        block = coef @ features
        if noise:
            block += noise * rng.standard_normal((m, d))
        out[start:start + m] = block
    return Synthetic(out, features.astype(np.float32), probs)


def recovery(decoder_rows: np.ndarray, features: np.ndarray, threshold: float = 0.9):
    """(MMCS, fraction recovered, best cosine per feature): for every true feature the best
    cosine similarity with any decoder row; MMCS is their mean, recovered those >= threshold."""
    rows = decoder_rows / np.maximum(np.linalg.norm(decoder_rows, axis=1, keepdims=True), 1e-12)
    best = (features @ rows.T).max(axis=1)
    return float(best.mean()), float((best >= threshold).mean()), best


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    """Generated vectors with known features (see the module docstring): training rows, then
    held-out rows of the same draw."""

    rows: int = 262_144
    """Training vectors."""
    eval_rows: int = 16_384
    """Held-out vectors."""
    d: int = 256
    """Width of the vectors."""
    features: int = 512
    """True features G."""
    mean_active: float = 5.0
    """Features active per vector, on average."""
    decay: float = 0.99
    """Feature i fires with probability proportional to decay^i."""
    noise: float = 0.0
    """Standard deviation of Gaussian noise added to every coordinate."""
    correlation: float = 0.0
    """> 0: correlated firing through a Gaussian copula."""
    data_seed: int = 0
    """The draw."""

    def __post_init__(self):
        for name in ("rows", "eval_rows", "d", "features"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not (self.mean_active > 0 and 0 < self.decay and self.noise >= 0):
            raise ValueError("mean_active and decay must be positive, noise >= 0")

    def generate(self) -> Synthetic:
        return generate(self.rows + self.eval_rows, d=self.d, n_features=self.features,
                        mean_active=self.mean_active, decay=self.decay, noise=self.noise,
                        correlation=self.correlation, seed=self.data_seed)
