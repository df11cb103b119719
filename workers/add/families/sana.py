"""Sana: ``SanaTransformer2DModel`` (linear-attention DiT), a Gemma-2 text encoder, ``AutoencoderDC``."""

from __future__ import annotations

import inspect

from diffusers import AutoencoderDC, SanaPipeline, SanaTransformer2DModel
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer

from workers.add.codec import LatentCodec
from workers.add.conditioning import Conditioning
from workers.add.families.base import TeacherFolder, TeacherParts, TransformerFamily
from workers.add.text_encoders import SanaPromptEncoder

# The instruction SanaPipeline puts before every prompt by default, read from diffusers, not copied.
SANA_INSTRUCTION = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default


def flow_scheduler_config(config: dict) -> dict:
    """Sana ships a flow-sigma DPM-Solver config; its training path is the rectified flow of
    ``FlowMatchEulerDiscreteScheduler`` with the static shift ``flow_shift``."""
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler" or not config.get("use_flow_sigmas"):
        return config
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": config.get("num_train_timesteps", 1000),
        "shift": config.get("flow_shift", 1.0),
    }


class SanaFamily(TransformerFamily):
    name = "sana"
    classes = {"SanaTransformer2DModel": SanaTransformer2DModel}
    # self-attention (linear) and cross-attention projections of every block
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def scheduler_config(self, config: dict) -> dict:
        return flow_scheduler_config(config)

    def load(
        self, folder: TeacherFolder, config: dict, *, resolution: int | None, guidance: float | None
    ) -> TeacherParts:
        why = "a Sana transformer (Gemma-2)"
        folder.need("text_encoder", "tokenizer", "vae", why=why)
        folder.expect_model_type("text_encoder", "gemma2", why)
        if config.get("guidance_embeds"):
            raise ValueError(f"{folder.source}: guidance-embedded Sana (SANA-Sprint) is not supported")
        encoder = SanaPromptEncoder(
            folder.load(AutoTokenizer, "tokenizer"),
            folder.load_model(AutoModel, "text_encoder"),
            complex_human_instruction=SANA_INSTRUCTION,
        )
        if encoder.pooled_dim != config["caption_channels"]:
            raise ValueError(
                f"{folder.source}: the text encoder has {encoder.pooled_dim} channels, but the transformer's "
                f"caption_channels is {config['caption_channels']}"
            )
        codec = LatentCodec(folder.load_model(AutoencoderDC, "vae"))
        return TeacherParts(folder.load_model(SanaTransformer2DModel, "transformer"), encoder, codec)

    def model_output(self, net: nn.Module, x_t: Tensor, timestep: Tensor, cond: Conditioning | None) -> Tensor:
        if cond is None or cond.prompt_embeds is None:
            raise ValueError("SanaTransformer2DModel needs Conditioning.prompt_embeds")
        out = net(
            hidden_states=x_t,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_attention_mask=cond.prompt_mask,
            timestep=timestep * net.config.timestep_scale,
            return_dict=False,
        )[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # learned sigma: the velocity is the first half
            out = out.chunk(2, dim=1)[0]
        return out

    def pipeline(self, net: nn.Module, scheduler, encoder: SanaPromptEncoder, vae: nn.Module):
        return SanaPipeline(
            transformer=net,
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoder.text_encoder,
            tokenizer=encoder.tokenizer,
        )
