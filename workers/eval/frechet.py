"""The Fréchet distance between two Gaussians fitted to features (FID when the features are Inception's).

d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)          (Heusel et al. 2017, Eq. 6)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg


@dataclass(frozen=True)
class FeatureStats:
    """μ and Σ of a feature set (float64), and how many samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"features must be (N ≥ 2, D), got shape {x.shape}")
        return cls(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), count=len(x))


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """d² between the Gaussians of ``a`` and ``b``.

    Tr((Σ₁ Σ₂)^½) is the sum of the square roots of the eigenvalues of Σ₁ Σ₂, which are real and
    non-negative (it is similar to Σ₁^½ Σ₂ Σ₁^½); the eigenvalues stay stable where ``sqrtm``
    fails on the singular Σ of fewer samples than dimensions.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    eigenvalues = linalg.eigvals(a.sigma @ b.sigma)
    tr_covmean = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()  # imaginary parts are rounding noise
    return float(max(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean, 0.0))
