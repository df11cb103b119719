"""The teacher job's ``network:`` section: which teacher network plain diffusion trains.

Light on purpose (pydantic only): ``orchestrator/teacher_job.py`` composes it into the job spec and
``workers/diffusion/networks.py`` builds the network from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from workers.config import Section

RESOLUTION = 32  # the benchmark's images: Fashion-MNIST padded to 32×32, one channel


class TeacherNetworkSpec(Section):
    """A caption-conditioned pixel teacher at 32×32: the benchmark's UNet (DDPM, v-prediction) or an
    SD3-shaped MMDiT (``SD3Transformer2DModel``, flow matching) reading the caption's tokens."""

    architecture: Literal["unet", "sd3"] = Field(
        "unet",
        description="unet: UNet2DModel, cosine DDPM schedule, v-prediction, the pooled caption embedding; "
        "sd3: SD3Transformer2DModel, rectified flow (velocity), the caption's tokens and pooled embedding",
    )
    width: int = Field(128, ge=16, description="sd3: the transformer's width (attention heads × head_dim)")
    depth: int = Field(6, ge=1, description="sd3: joint transformer blocks")
    head_dim: int = Field(32, ge=8, description="sd3: channels per attention head")
    patch_size: Literal[1, 2, 4] = Field(2, description="sd3: pixels per token side (32 / patch_size tokens a side)")
    text_tokens: int = Field(32, ge=4, le=256, description="sd3: caption tokens the text stream holds (padded)")
    shift: float = Field(1.0, gt=0, description="sd3: the flow schedule's static timestep shift (SD3 uses 3 at 1024²)")
    logit_normal_std: float = Field(
        1.0, gt=0, description="sd3: σ drawn logit-normal(0, std) per image, as SD3 trains; larger spreads it wider"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.architecture == "sd3" and self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
        return self


def network_of(config: dict) -> TeacherNetworkSpec:
    """The network a teacher run's config.json (or its checkpoint's config) records; runs from
    before networks were configurable trained the UNet."""
    return TeacherNetworkSpec.model_validate(config.get("network", {}))
