"""The Fashion-MNIST classifier as the benchmark's measuring instruments.

- ``ClassifierFeatures``: its 128-d penultimate layer, the feature space of FID and recall;
- ``ClassAccuracy``: the prompt-alignment scorer, 1 when the classifier assigns an image the
  class its prompt names, else 0 (the analogue of CLIP score).

Job files name the factories: ``eval.features: workers.benchmark.evaluator:ClassifierFeatures`` and
``eval.scorer: workers.benchmark.evaluator:ClassAccuracy``. The discriminator never uses them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from workers.benchmark.classifier import FashionClassifier, load_classifier
from workers.data.fashion_mnist import FASHION_MNIST_NOUNS

SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "fashion-mnist" / "evaluator"


def prompt_label(prompt: str) -> int:
    """The class a caption names: the longest class noun phrase it contains ("an ankle boot" over "a bag")."""
    text = f" {str(prompt).lower()} "
    nouns = enumerate(FASHION_MNIST_NOUNS)
    found = [(len(noun), label) for label, noun in nouns if noun[noun.index(" ") :] + " " in text]
    if not found:
        raise ValueError(f"prompt {prompt!r} names no Fashion-MNIST class ({', '.join(FASHION_MNIST_NOUNS)})")
    return max(found)[1]


def _classifier(folder: str | Path | None) -> FashionClassifier:
    return load_classifier(folder or SHIPPED)


class ClassifierFeatures:
    """(N, 1, H, W) images in [0, 1] -> (N, 128) penultimate features of the shipped classifier."""

    def __init__(self, folder: str | Path | None = None):
        self.model = _classifier(folder)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        return self.model.features(images.float() * 2 - 1)


class ClassAccuracy:
    """1.0 where the classifier's class is the one the prompt names, else 0.0."""

    def __init__(self, folder: str | Path | None = None):
        self.model = _classifier(folder)

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.model(images.float() * 2 - 1).argmax(dim=1)

    def __call__(self, images: Tensor, prompts: list) -> Tensor:
        labels = torch.tensor([prompt_label(p) for p in prompts])
        return (self.predict(images) == labels).float()
