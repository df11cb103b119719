"""FLUX.1: ``FluxTransformer2DModel`` on 2×2-packed latents with rotary position ids, CLIP pooled + T5
tokens, a shifted AutoencoderKL; guidance-distilled checkpoints (FLUX.1-dev) embed the guidance scale."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

from workers.add.codec import LatentCodec
from workers.add.conditioning import Conditioning
from workers.add.families.base import TeacherFolder, TeacherParts, TransformerFamily, joint_image_stream
from workers.add.families.sd3 import SD3_LORA_TARGETS
from workers.add.text_encoders import FluxPromptEncoder

# FluxPipeline's default guidance scale, the embedded guidance of a guidance-distilled teacher by default
DEFAULT_EMBEDDED_GUIDANCE = 3.5
# The transformer multiplies its timestep by 1000 itself; the pipeline passes σ·T / 1000.
FLUX_TIMESTEP_SCALE = 1000.0
PACK = 2  # FluxPipeline packs 2×2 latent patches into one token


class FluxFamily(TransformerFamily):
    name = "flux"
    classes = {"FluxTransformer2DModel": FluxTransformer2DModel}
    block_lists = ("transformer_blocks", "single_transformer_blocks")
    # the attention projections: double blocks' image and text streams (named as SD3's), single blocks' q, k, v
    lora_targets = SD3_LORA_TARGETS

    def load(
        self, folder: TeacherFolder, config: dict, *, resolution: int | None, guidance: float | None
    ) -> TeacherParts:
        why = "a FLUX transformer (CLIP and T5)"
        folder.need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", why=why)
        folder.expect_model_type("text_encoder", "clip_text_model", why)
        folder.expect_model_type("text_encoder_2", "t5", why)
        if "text_encoder_3" in folder.components:
            raise ValueError(
                f"{folder.source} has a text_encoder_3: that is SD3's encoder set, not FLUX's (CLIP and T5)"
            )
        if config.get("guidance_embeds") and guidance is None:
            guidance = DEFAULT_EMBEDDED_GUIDANCE
        encoder = FluxPromptEncoder(
            folder.load(CLIPTokenizer, "tokenizer"),
            folder.load_model(CLIPTextModel, "text_encoder"),
            folder.load(AutoTokenizer, "tokenizer_2"),
            folder.load_model(T5EncoderModel, "text_encoder_2"),
            guidance=guidance,
        )
        if encoder.pooled_dim != config["pooled_projection_dim"]:
            raise ValueError(
                f"{folder.source}: the CLIP encoder's pooled output has {encoder.pooled_dim} channels, but the "
                f"transformer's pooled_projection_dim is {config['pooled_projection_dim']}"
            )
        codec = LatentCodec(folder.load_model(AutoencoderKL, "vae"))
        if resolution is None:
            resolution = int(codec.vae.config.sample_size)
        # the dynamic shift reads the packed token count at the job's resolution
        side = resolution // codec.downsample_factor // PACK
        net = folder.load_model(FluxTransformer2DModel, "transformer")
        return TeacherParts(net, encoder, codec, image_seq_len=side * side)

    def guidance_embedded(self, net: nn.Module) -> bool:
        return bool(net.config.guidance_embeds)

    def sample_size(self, net: nn.Module, image_seq_len: int | None) -> int | None:
        """FLUX's config has no sample size: the latent side of the resolution it was loaded for."""
        return math.isqrt(image_seq_len) * PACK if image_seq_len else None

    def model_output(self, net: nn.Module, x_t: Tensor, timestep: Tensor, cond: Conditioning | None) -> Tensor:
        if cond is None or cond.prompt_embeds is None or cond.pooled is None:
            raise ValueError("FluxTransformer2DModel needs Conditioning.prompt_embeds and Conditioning.pooled")
        guidance = None
        if self.guidance_embedded(net):
            if cond.guidance is None:
                raise ValueError("a guidance-distilled FLUX transformer needs Conditioning.guidance")
            guidance = cond.guidance
        B, C, H, W = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, B, C, H, W)
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // PACK, W // PACK, x_t.device, x_t.dtype)
        # the text tokens all sit at position 0, as FluxPipeline.encode_prompt's text_ids
        txt_ids = torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = net(
            hidden_states=packed,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            timestep=timestep / FLUX_TIMESTEP_SCALE,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, H, W, 1)

    def patch_size(self, net: nn.Module) -> int:
        return PACK * int(net.config.patch_size)

    def image_tokens(self, output) -> Tensor:
        return joint_image_stream(output)

    def pipeline(self, net: nn.Module, scheduler, encoder: FluxPromptEncoder, vae: nn.Module):
        return FluxPipeline(
            transformer=net,
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoder.text_encoder,
            tokenizer=encoder.tokenizer,
            text_encoder_2=encoder.text_encoder_2,
            tokenizer_2=encoder.tokenizer_2,
        )
