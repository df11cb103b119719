"""Feature extractors for the Fréchet distance: images in, one feature vector per image out.

Any callable ``(images: (N, C, H, W) float in [0, 1]) -> (N, D)`` will do: Inception for SD-class
jobs (torchmetrics' port of the TF-FID network), a project-trained classifier's penultimate layer
for Fashion-MNIST, a tiny network in tests.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class FeatureExtractor(Protocol):
    """``features = extractor(images)``: (N, C, H, W) in [0, 1] -> (N, D)."""

    def __call__(self, images: Tensor) -> Tensor: ...


def as_rgb(images: Tensor) -> Tensor:
    """Grayscale images repeated to three channels (networks trained on RGB)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatures:
    """The 2048-d pool features of FID's Inception-v3 (torchmetrics ``FeatureExtractorInceptionV3``).

    Needs ``torchmetrics[image]`` and its weights (downloaded on first use, or already cached);
    constructing it without them raises an error that says so.
    """

    def __init__(self, feature: str = "2048", device: str | torch.device = "cpu"):
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as err:
            raise ImportError(
                "Inception features need torchmetrics[image] (pip install 'torchmetrics[image]') and its FID "
                "weights; or inject another feature extractor into the evaluator"
            ) from err
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature]).to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        uint8 = (as_rgb(images).clamp(0, 1) * 255).round().to(torch.uint8)  # the network resizes to 299 itself
        return self.net(uint8.to(self.device)).reshape(len(images), -1).float().cpu()
