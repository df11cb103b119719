"""One signature for every diffusers UNet: ``x0 = denoise(x_t, t, cond)``.

Like k-diffusion's ``external.py`` wraps a discrete ε-UNet as a denoiser, this wraps
``UNet2DModel`` and ``UNet2DConditionModel`` (SD 1.x/2.x and SDXL form) of any prediction type,
so teacher, student and samplers never look at prediction types or UNet keyword arguments.
"""

from __future__ import annotations

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.schedule import NoiseSchedule


def is_diffusers_unet(net: nn.Module) -> bool:
    return isinstance(net, (UNet2DModel, UNet2DConditionModel))


def unet_inputs(unet: nn.Module, cond: Conditioning) -> dict:
    """The keyword arguments a diffusers UNet takes for this conditioning, checked for what it needs."""
    config = unet.config
    if isinstance(unet, UNet2DModel):
        needs_labels = config.get("num_class_embeds") is not None or config.get("class_embed_type")
        if needs_labels and cond.class_labels is None:
            raise ValueError("this UNet2DModel is class-conditioned: Conditioning.class_labels is required")
        return {"class_labels": cond.class_labels if needs_labels else None}
    if cond.prompt_embeds is None:
        raise ValueError("UNet2DConditionModel needs Conditioning.prompt_embeds (encoder_hidden_states)")
    kwargs = {"encoder_hidden_states": cond.prompt_embeds, "class_labels": cond.class_labels}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and time ids
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("an SDXL UNet needs Conditioning.pooled (text_embeds) and Conditioning.time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return kwargs


class Denoiser(nn.Module):
    """A diffusers UNet plus its noise schedule, returning x0-estimates.

    Any other network that takes ``(x_t, t, cond)`` and returns a model output works too (the
    toy problem's MLPs and its closed-form denoiser).
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.unet = unet
        self.schedule = schedule

    def model_output(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The UNet's raw output (ε, v or x0, per the schedule's prediction type)."""
        t = t.to(x_t.device).reshape(-1).expand(x_t.shape[0])
        if not is_diffusers_unet(self.unet):
            return self.unet(x_t, t, cond)
        return self.unet(x_t, t, **unet_inputs(self.unet, cond), return_dict=False)[0]

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x0 = denoise(x_t, t, cond)."""
        return self.schedule.to_x0(self.model_output(x_t, t, cond), x_t, t)
