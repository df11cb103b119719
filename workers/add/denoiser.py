"""One signature for every denoising network: ``x0 = denoise(x_t, t, cond)``.

Like k-diffusion's ``external.py`` wraps a discrete ε-UNet as a denoiser, this wraps every network of a
supported family (diffusers UNets; SD3, FLUX and Sana transformers: ``workers.add.families``) of any
prediction type, so teacher, student and samplers never look at prediction types, keyword arguments
or latent packing.
"""

from __future__ import annotations

from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.families import Family, family_of
from workers.add.schedule import NoiseSchedule


class Denoiser(nn.Module):
    """A network of a supported family plus its noise schedule, returning x0-estimates.

    Any other network that takes ``(x_t, t, cond)`` and returns a model output works too (the
    toy problem's MLPs and its closed-form denoiser).
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.unet = unet  # the network, UNet or transformer (the name every caller already uses)
        self.schedule = schedule

    @property
    def family(self) -> Family | None:
        return family_of(self.unet)

    @property
    def guidance_embedded(self) -> bool:
        """Whether the network takes the guidance scale as an input (FLUX.1-dev): no CFG for it."""
        family = self.family
        return family is not None and family.guidance_embedded(self.unet)

    def model_output(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The network's raw output (ε, v, x0 or flow velocity, per the schedule's prediction type)."""
        t = t.to(x_t.device).reshape(-1).expand(x_t.shape[0])
        family = self.family
        if family is None:
            return self.unet(x_t, t, cond)
        return family.model_output(self.unet, x_t, self.schedule.model_timestep(t), cond)

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x0 = denoise(x_t, t, cond)."""
        return self.schedule.to_x0(self.model_output(x_t, t, cond), x_t, t)
