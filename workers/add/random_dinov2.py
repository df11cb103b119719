"""A DINOv2-shaped ViT with random weights, saved as a ``Dinov2Model`` folder.

For the ablation of the discriminator's feature network where DINOv2's pretrained weights cannot
be downloaded: the same architecture as ``facebook/dinov2-small`` (22M parameters, patch 14), but
untrained, so it measures what the architecture alone gives a Projected-GAN discriminator. With
internet access, point ``discriminator.dinov2`` at the real weights instead.

    addctl random-dinov2 runs/dinov2-small-shaped
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model

SHAPES = {
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def save_dinov2_shaped(folder: str | Path, shape: str = "small", seed: int = 0) -> Path:
    """Write a randomly initialised ``Dinov2Model`` of DINOv2-``shape``'s architecture to ``folder``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown DINOv2 shape {shape!r}: one of {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(patch_size=14, image_size=518, **SHAPES[shape])).eval()
    model.save_pretrained(folder)
    return Path(folder)
