"""D_φ,k: the light trainable head on one tapped layer k of the frozen feature network F.

The StyleGAN-T head (Sauer et al. 2023, ``networks/discriminator.py``): a spectral-normed
kernel-1 conv block, a residual block with a wide kernel, and a projection to a small condition
map, conditioned by projection (Miyato & Koyama 2018). It runs over tokens (B, C, N) with 1-D
convolutions (DINOv2) or over feature grids (B, C, H, W) with 2-D convolutions (the LADD teacher).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

# Tokens: StyleGAN-T's kernel 9. Grids (ours): 3×3, the same nine taps per output; a 9×9 kernel
# would cost 9× the parameters (130M per head at a 1280-channel SD block).
DEFAULT_KERNEL_SIZE = {1: 9, 2: 3}


class BatchNormLocal(nn.Module):
    """Batch norm over virtual batches of ``virtual_bs`` samples, with no running statistics.

    Each group of samples is normalised with its own mean and variance over (samples, positions),
    so the statistics do not depend on the total batch (StyleGAN-T); train and eval behave alike.
    """

    def __init__(self, num_features: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        if virtual_bs < 1:
            raise ValueError(f"virtual_bs must be at least 1, got {virtual_bs}")
        self.virtual_bs = virtual_bs
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise (B, C, ...) per channel within each virtual batch."""
        h = x.flatten(2).float()  # positions of tokens or grids alike; statistics in float32
        # split() leaves a smaller last group when B is not a multiple of virtual_bs.
        groups = []
        for g in h.split(self.virtual_bs):
            mean = g.mean(dim=(0, 2), keepdim=True)
            var = g.var(dim=(0, 2), keepdim=True, unbiased=False)
            groups.append((g - mean) * torch.rsqrt(var + self.eps))
        h = torch.cat(groups) * self.weight[:, None] + self.bias[:, None]
        return h.to(x.dtype).view(x.shape)


def _conv(spatial_dims: int, c_in: int, c_out: int, kernel_size: int) -> nn.Module:
    """A spectral-normed convolution that keeps the number of positions."""
    conv_cls = nn.Conv1d if spatial_dims == 1 else nn.Conv2d
    # Tokens wrap around as in StyleGAN-T; a grid is an image, so its border is zero-padded (ours).
    padding_mode = "circular" if spatial_dims == 1 and kernel_size > 1 else "zeros"
    conv = conv_cls(c_in, c_out, kernel_size, padding=kernel_size // 2, padding_mode=padding_mode)
    return spectral_norm(conv)


class ConvBlock(nn.Sequential):
    """Spectral-normed conv → BatchNormLocal → LeakyReLU(0.2)."""

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int, virtual_bs: int):
        super().__init__(
            _conv(spatial_dims, channels, channels, kernel_size),
            BatchNormLocal(channels, virtual_bs),
            nn.LeakyReLU(0.2),
        )


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation (Karras et al. 2018, §3; ours in ADD's heads): one extra
    channel holding, for each group of ``group_size`` samples, the standard deviation of the features
    across the group averaged over channels and positions. A group of near-copies (a student that
    gives one prototype per prompt) shows a small value that no single sample can show; the heads can
    see the lost diversity. Groups are consecutive samples, so a group must hold one kind (real or fake).
    """

    def __init__(self, group_size: int):
        super().__init__()
        if group_size < 2:
            raise ValueError(f"a minibatch-std group needs at least 2 samples, got {group_size}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, ...) → (B, C + 1, ...); a last group smaller than ``group_size`` gets its own value."""
        stats = []
        for g in x.float().split(self.group_size):
            std = (g.var(dim=0, unbiased=False) + 1e-8).sqrt().mean() if len(g) > 1 else g.new_zeros(())
            stats.append(std.expand(len(g), 1, *g.shape[2:]))
        return torch.cat([x, torch.cat(stats).to(x.dtype)], dim=1)


class ResidualBlock(nn.Module):
    """(block(x) + x)/√2, which keeps the variance of the sum that of its terms."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return (self.block(x) + x) / math.sqrt(2)


class DiscriminatorHead(nn.Module):
    """D_φ,k: per-position logits (B, N) from features (B, C, N) or (B, C, H, W) and condition c.

    With ``c_dim > 0`` the logit is the projection ⟨out, W c⟩/√cmap_dim of the head's output on the
    mapped condition (Miyato & Koyama); with ``c_dim == 0`` the head projects to one channel. With
    ``minibatch_std`` ≥ 2 the last conv also sees ``MinibatchStd`` over groups of that many samples.
    """

    def __init__(
        self,
        channels: int,
        c_dim: int,
        cmap_dim: int = 64,
        spatial_dims: int = 1,
        kernel_size: int | None = None,
        virtual_bs: int = 8,
        minibatch_std: int = 0,
    ):
        super().__init__()
        if spatial_dims not in (1, 2):
            raise ValueError(f"spatial_dims must be 1 (tokens) or 2 (grids), got {spatial_dims}")
        kernel_size = kernel_size or DEFAULT_KERNEL_SIZE[spatial_dims]
        self.c_dim = c_dim
        self.cmap_dim = cmap_dim
        self.spatial_dims = spatial_dims
        self.main = nn.Sequential(
            ConvBlock(spatial_dims, channels, 1, virtual_bs),
            ResidualBlock(ConvBlock(spatial_dims, channels, kernel_size, virtual_bs)),
        )
        self.mbstd = MinibatchStd(minibatch_std) if minibatch_std else None
        self.cmapper = nn.Linear(c_dim, cmap_dim) if c_dim > 0 else None
        self.cls = _conv(spatial_dims, channels + (self.mbstd is not None), cmap_dim if c_dim > 0 else 1, 1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """Logits (B, N_tokens), or (B, H·W) for grids."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(f"head expects {self.spatial_dims + 2}-D features, got shape {tuple(x.shape)}")
        # A half-precision backbone feeds float32 heads. (Reading cls.weight would run a power iteration.)
        x = x.to(self.cls.bias.dtype)
        h = self.main(x)
        if self.mbstd is not None:
            h = self.mbstd(h)
        out = self.cls(h).flatten(2)  # (B, cmap_dim or 1, N)
        if self.cmapper is None:
            return out[:, 0]
        if c is None:
            raise ValueError(f"this head is conditional (c_dim={self.c_dim}) but got no condition c")
        cmap = self.cmapper(c.to(out.dtype)).unsqueeze(-1)  # (B, cmap_dim, 1)
        return (out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)
