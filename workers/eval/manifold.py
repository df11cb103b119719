"""Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space.

Each set's manifold is the union of balls around its samples, each ball reaching the sample's k-th
nearest neighbour in its own set (k = 3). Precision: the fraction of generated samples inside the
real manifold (fidelity). Recall: the fraction of real samples inside the generated manifold
(diversity: a student that collapses onto a few modes covers few real samples).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_float(x) -> Tensor:
    return torch.as_tensor(x).detach().cpu().to(torch.float64)


def knn_radii(features: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (itself excluded)."""
    x = _as_float(features)
    if len(x) <= k:
        raise ValueError(f"k-NN radii need more than k={k} samples, got {len(x)}")
    radii = [torch.cdist(x[i : i + chunk], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), chunk)]
    return torch.cat(radii)


def coverage(queries: Tensor, support: Tensor, k: int = 3, chunk: int = 2048) -> float:
    """The fraction of ``queries`` inside the k-NN manifold of ``support``."""
    q, s = _as_float(queries), _as_float(support)
    radii = knn_radii(s, k, chunk)
    inside = [
        (torch.cdist(q[i : i + chunk], s) <= radii[None, :]).any(dim=1) for i in range(0, len(q), chunk)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """``{"precision": ..., "recall": ...}`` of generated features ``fake`` against ``real``."""
    return {"precision": coverage(fake, real, k), "recall": coverage(real, fake, k)}
