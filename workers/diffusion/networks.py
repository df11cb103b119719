"""The teacher networks plain diffusion trains (``TeacherNetworkSpec``): what each one is, how its
training draws t and its target, and what its exported folder holds.

- ``PixelUNet``: the benchmark's UNet2DModel (1.4M parameters), cosine DDPM schedule, v-prediction;
  the caption's pooled embedding is added to the time embedding.
- ``PixelMMDiT``: an SD3-shaped ``SD3Transformer2DModel`` on pixels (in_channels 1, no VAE),
  rectified flow x_t = (1 − σ)·x0 + σ·ε with velocity v = ε − x0, σ drawn logit-normal as SD3
  trains; the text stream holds the caption's tokens, the pooled embedding feeds ``pooled_projections``.

Both are called through their family (``workers.add.families``), the same call the ADD step makes,
so a teacher trained here is the teacher ``load_teacher`` reads.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DModel
from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.families import family_of
from workers.add.schedule import NoiseSchedule, schedule_from_scheduler_config
from workers.diffusion.config import RESOLUTION, TeacherNetworkSpec

# Cosine schedule, v-prediction: what BENCHMARK.md measured; ᾱ_T ≈ 0 without rescaling.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
}


def fashion_mnist_unet(embedding_dim: int = 384) -> UNet2DModel:
    """1.4M parameters at 32×32, attention only at 8×8; the caption's pooled embedding is added to
    the time embedding (``class_embed_type="identity"``), which is 3× cheaper than cross-attention."""
    return UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        class_embed_type="identity",
        time_embedding_dim=embedding_dim,
        norm_num_groups=8,
        attention_head_dim=16,
    )


class TeacherNetwork:
    """One architecture the teacher job trains. Subclasses set ``folder`` and ``text_tokens``."""

    folder: str  # the diffusers subfolder of the exported network: "unet" or "transformer"
    text_tokens: int | None  # caption tokens the network reads (None: the pooled embedding only)

    def __init__(self, spec: TeacherNetworkSpec):
        self.spec = spec

    def build(self, embedding_dim: int) -> nn.Module:
        raise NotImplementedError

    def scheduler(self):
        """The diffusers scheduler saved beside the network (its config is the teacher's schedule)."""
        raise NotImplementedError

    def schedule(self) -> NoiseSchedule:
        """The schedule its scheduler config describes, as ``load_teacher`` will read it."""
        return schedule_from_scheduler_config(dict(self.scheduler().config))

    def draw_t(self, g: torch.Generator, n: int, schedule: NoiseSchedule) -> Tensor:
        """Training timestep indices; uniform over the grid unless the architecture says otherwise."""
        return torch.randint(schedule.num_train_timesteps, (n,), generator=g)

    def conditioning(self, captions: Conditioning) -> Conditioning:
        """What the network reads of a batch of encoded captions (``pooled``, and ``prompt_embeds``
        when the encoder keeps the tokens)."""
        raise NotImplementedError

    def predict(self, net: nn.Module, x_t: Tensor, t: Tensor, schedule: NoiseSchedule, cond: Conditioning) -> Tensor:
        """The network's raw output, called as the ADD step calls it (through its family)."""
        return family_of(net).model_output(net, x_t, schedule.model_timestep(t), cond)


class PixelUNet(TeacherNetwork):
    folder = "unet"
    text_tokens = None

    def build(self, embedding_dim: int) -> nn.Module:
        return fashion_mnist_unet(embedding_dim)

    def scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(**SCHEDULER_CONFIG)

    def conditioning(self, captions: Conditioning) -> Conditioning:
        return Conditioning(pooled=captions.pooled, class_labels=captions.pooled)


class PixelMMDiT(TeacherNetwork):
    folder = "transformer"

    def __init__(self, spec: TeacherNetworkSpec):
        super().__init__(spec)
        self.text_tokens = spec.text_tokens

    def build(self, embedding_dim: int) -> nn.Module:
        s = self.spec
        return SD3Transformer2DModel(
            sample_size=RESOLUTION,
            patch_size=s.patch_size,
            in_channels=1,
            out_channels=1,
            num_layers=s.depth,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.width // s.head_dim,
            joint_attention_dim=embedding_dim,  # the caption's token states, projected to the width
            caption_projection_dim=s.width,
            pooled_projection_dim=embedding_dim,
            pos_embed_max_size=RESOLUTION // s.patch_size,
        )

    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.spec.shift)

    def draw_t(self, g: torch.Generator, n: int, schedule: NoiseSchedule) -> Tensor:
        """u ~ logit-normal(0, std) on the unshifted grid, as SD3's training draws it; the index then
        carries the shift (σ_t = shift(u))."""
        u = torch.sigmoid(torch.randn(n, generator=g) * self.spec.logit_normal_std)
        T = schedule.num_train_timesteps
        return (u * T).long().clamp(max=T - 1)

    def conditioning(self, captions: Conditioning) -> Conditioning:
        if captions.prompt_embeds is None:
            raise ValueError("the sd3 teacher reads the caption's tokens: encode the captions with tokens")
        return Conditioning(prompt_embeds=captions.prompt_embeds, pooled=captions.pooled)


def teacher_network(spec: TeacherNetworkSpec | None = None) -> TeacherNetwork:
    """The architecture ``spec`` names (default: the benchmark's UNet)."""
    spec = spec or TeacherNetworkSpec()
    return {"unet": PixelUNet, "sd3": PixelMMDiT}[spec.architecture](spec)
