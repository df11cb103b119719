"""ψ, the teacher: a frozen pretrained denoiser with classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.denoiser import Denoiser
from workers.add.frozen import FrozenModule
from workers.add.schedule import NoiseSchedule, schedule_from_scheduler_config


class Teacher(FrozenModule):
    """The frozen teacher ψ: ``x0 = denoise(x_t, t, cond, guidance_scale)``.

    Holds what it needs to read prompts (``prompt_encoder``, may be ``None`` for unconditional
    models) and latents (``codec``, ``None`` for pixel-space models), and the scheduler config it
    was trained with, from which the student derives its own schedule (DDPM or flow matching,
    ``schedule_from_scheduler_config``).
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: dict,
        prompt_encoder: nn.Module | None = None,
        codec: nn.Module | None = None,
        image_seq_len: int | None = None,
    ):
        super().__init__()
        self.scheduler_config = dict(scheduler_config)
        self.image_seq_len = image_seq_len  # a resolution-shifted flow schedule (FLUX) needs the token count
        schedule = schedule_from_scheduler_config(self.scheduler_config, image_seq_len=image_seq_len)
        self.denoiser = Denoiser(unet, schedule)
        self.prompt_encoder = prompt_encoder
        self.codec = codec
        self.freeze()

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def unet(self) -> nn.Module:
        return self.denoiser.unet

    def encode_prompts(self, prompts) -> Conditioning:
        """Captions (or labels, for label-conditioned teachers) to a Conditioning."""
        if self.prompt_encoder is None:
            raise ValueError("this teacher is unconditional: it has no prompt encoder")
        return self.prompt_encoder.encode(prompts)

    def null_conditioning(self, batch_size: int) -> Conditioning | None:
        """The empty prompt that guidance pushes away from; ``None`` for unconditional teachers."""
        return None if self.prompt_encoder is None else self.prompt_encoder.null(batch_size)

    def denoise_cond_uncond(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        """Conditional and unconditional x0-estimates from one batched network call (one unbatched call,
        both the same, for a guidance-distilled teacher: its guidance is an input, not CFG)."""
        null = self.null_conditioning(x_t.shape[0])
        if null is None or self.denoiser.guidance_embedded:
            x0 = self.denoiser(x_t, t, cond)
            return x0, x0
        t = t.reshape(-1).expand(x_t.shape[0])
        both = self.denoiser(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning.cat([cond, null]))
        x0_cond, x0_uncond = both.chunk(2)
        return x0_cond, x0_uncond

    def denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning, guidance_scale: float = 1.0) -> Tensor:
        """x̂ψ(x_t, t, c) with classifier-free guidance against the empty prompt.

        Guidance is applied to x0-estimates; for a fixed x_t and t every prediction type is an
        affine function of x0, so this equals guiding ε or v. A guidance-distilled teacher (FLUX.1-dev) runs
        no CFG: it reads the scale it was loaded with from ``Conditioning.guidance``.
        """
        if guidance_scale == 1.0 or self.prompt_encoder is None or self.denoiser.guidance_embedded:
            return self.denoiser(x_t, t, cond)
        x0_cond, x0_uncond = self.denoise_cond_uncond(x_t, t, cond)
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond)
