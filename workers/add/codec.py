"""The latent codec of latent teachers: pixels in [-1, 1] to scaled latents and back."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from workers.add.frozen import FrozenModule


class LatentCodec(FrozenModule):
    """A frozen diffusers ``AutoencoderKL`` in the convention of the diffusers pipelines.

    ``encode`` gives z = (mode of the posterior − shift_factor) · scaling_factor, the latents the
    UNet was trained on; ``decode`` inverts it. Decoding stays differentiable w.r.t. the latents
    (ADD decodes the student's latents and computes both losses in pixel space); only the
    weights are frozen.
    """

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.freeze()

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f); no gradient (data encoding)."""
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return (posterior.mode() - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to pixels in [-1, 1] (not clamped), differentiable w.r.t. ``latents``."""
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]
