"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of the discriminator's inputs.

ADD augments real and fake alike before the feature network F, as StyleGAN-T does. Every op is
a differentiable function of the image, so the generator's gradient passes through it; the
random draws come from an optional ``torch.Generator``, so a seeded call is reproducible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_POLICY = "color,translation,cutout"


def _device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    # Draw where the generator lives, so one seed gives the same augmentation on any device.
    return generator.device if generator is not None else x.device


def _rand(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One uniform number in [0, 1) per sample, shaped (B, 1, 1, 1)."""
    u = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=_device(x, generator))
    return u.to(x)


def _randint(low: int, high: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One integer in [low, high) per sample, shaped (B, 1, 1)."""
    n = torch.randint(low, high, (x.shape[0], 1, 1), generator=generator, device=_device(x, generator))
    return n.to(x.device)


def brightness(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Add one offset in [-0.5, 0.5) per sample."""
    return x + (_rand(x, generator) - 0.5)


def saturation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale the deviation from the channel mean by a factor in [0, 2)."""
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, generator) * 2) + mean


def contrast(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Scale the deviation from the image mean by a factor in [0.5, 1.5)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, generator) + 0.5) + mean


def translation(x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.125) -> Tensor:
    """Shift each sample by up to ``ratio`` of its size, filling the vacated border with zeros."""
    B, _, H, W = x.shape
    pad_h, pad_w = int(H * ratio + 0.5), int(W * ratio + 0.5)
    dy = _randint(-pad_h, pad_h + 1, x, generator)
    dx = _randint(-pad_w, pad_w + 1, x, generator)
    x_pad = F.pad(x, [pad_w, pad_w, pad_h, pad_h])
    # Gather a shifted H×W window per sample: index tensors broadcast to (B, H, W).
    rows = torch.arange(H, device=x.device).view(1, H, 1) + dy + pad_h
    cols = torch.arange(W, device=x.device).view(1, 1, W) + dx + pad_w
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return x_pad.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: Tensor, generator: torch.Generator | None = None, ratio: float = 0.5) -> Tensor:
    """Zero one square of ``ratio`` of the size per sample, centred anywhere (clipped at borders)."""
    _, _, H, W = x.shape
    size_h, size_w = int(H * ratio + 0.5), int(W * ratio + 0.5)
    top = _randint(0, H + (1 - size_h % 2), x, generator) - size_h // 2
    left = _randint(0, W + (1 - size_w % 2), x, generator) - size_w // 2
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    hole = (rows >= top) & (rows < top + size_h) & (cols >= left) & (cols < left + size_w)
    return x * (~hole).unsqueeze(1).to(x.dtype)


# Each policy name expands to its ops, applied in this order (the order of the original DiffAugment).
POLICY_OPS = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


class DiffAugment(nn.Module):
    """``aug(x, generator)``: the ops of a comma-separated policy applied to (B, C, H, W) images.

    An empty policy is the identity. No parameters; a module only so it shows in the discriminator.
    """

    def __init__(self, policy: str = DEFAULT_POLICY):
        super().__init__()
        names = [name.strip() for name in policy.split(",") if name.strip()]
        unknown = [name for name in names if name not in POLICY_OPS]
        if unknown:
            raise ValueError(
                f"unknown augmentation {', '.join(map(repr, unknown))}: allowed are {', '.join(POLICY_OPS)}"
            )
        self.policy = ",".join(names)
        self.ops = [op for name in names for op in POLICY_OPS[name]]

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The augmented images, same shape as ``x``."""
        for op in self.ops:
            x = op(x, generator)
        return x

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}"
