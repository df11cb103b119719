"""The latent codec of latent teachers: pixels in [-1, 1] to scaled latents and back."""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, AutoencoderKL
from torch import Tensor, nn

from workers.add.frozen import FrozenModule


class LatentCodec(FrozenModule):
    """A frozen diffusers VAE in the convention of the diffusers pipelines.

    ``encode`` gives z = (E(x) − shift_factor) · scaling_factor, the latents the denoiser was trained on,
    with E(x) the posterior's mode for ``AutoencoderKL`` (SD, SDXL, SD3, FLUX: those with a shift factor)
    and the deterministic latent for ``AutoencoderDC`` (Sana's deep-compression autoencoder, no shift);
    ``decode`` inverts it. Decoding stays differentiable w.r.t. the latents (ADD decodes the student's
    latents and computes both losses in pixel space); only the weights are frozen.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        if not isinstance(vae, (AutoencoderKL, AutoencoderDC)):
            raise ValueError(f"unsupported VAE {type(vae).__name__}: supported are AutoencoderKL, AutoencoderDC")
        self.vae = vae
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        self.latent_channels = int(config.latent_channels)
        blocks = config.encoder_block_out_channels if isinstance(vae, AutoencoderDC) else config.block_out_channels
        self.downsample_factor = 2 ** (len(blocks) - 1)
        self.freeze()

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] to latents (B, C, H/f, W/f); no gradient (data encoding)."""
        encoded = self.vae.encode(pixels.to(self.vae.dtype))
        z = encoded.latent if isinstance(self.vae, AutoencoderDC) else encoded.latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to pixels in [-1, 1] (not clamped), differentiable w.r.t. ``latents``."""
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]
