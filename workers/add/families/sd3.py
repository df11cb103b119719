"""SD3 / SD3.5: ``SD3Transformer2DModel`` (MMDiT), CLIP-L + CLIP-G + T5, a shifted AutoencoderKL.

The same transformer with one sentence encoder (any non-CLIP transformers encoder, e.g. the
benchmark's all-MiniLM-L6-v2: its token states feed the text stream, their mean the pooled
projection) and no VAE is the benchmark's pixel MMDiT teacher (``workers/diffusion/networks.py``).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from workers.add.codec import LatentCodec
from workers.add.conditioning import Conditioning
from workers.add.families.base import TeacherFolder, TeacherParts, TransformerFamily, joint_image_stream
from workers.add.text_encoders import SD3PromptEncoder, SentencePromptEncoder

# the joint attention's projections: image stream (to_*), text stream (add_*), SD3.5's second attention
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Family(TransformerFamily):
    name = "sd3"
    classes = {"SD3Transformer2DModel": SD3Transformer2DModel}
    lora_targets = SD3_LORA_TARGETS

    def load(
        self, folder: TeacherFolder, config: dict, *, resolution: int | None, guidance: float | None
    ) -> TeacherParts:
        if not folder.index and "text_encoder_2" not in folder.components and "text_encoder" in folder.components:
            # the project's own layout (no model_index.json), one encoder: the benchmark's pixel MMDiT
            if not folder.model_type("text_encoder").startswith("clip"):
                return self._load_sentence_encoded(folder, config)
        why = "an SD3 transformer (CLIP-L, CLIP-G and T5)"
        folder.need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", why=why)
        folder.expect_model_type("text_encoder", "clip_text_model", why)
        folder.expect_model_type("text_encoder_2", "clip_text_model", why)
        t5 = None, None
        if not folder.explicitly_absent("text_encoder_3"):  # model_index [null, null]: run without T5
            folder.need(
                "text_encoder_3", "tokenizer_3", why=why + "; mark it [null, null] in model_index.json to run without"
            )
            folder.expect_model_type("text_encoder_3", "t5", why)
            t5 = folder.load(AutoTokenizer, "tokenizer_3"), folder.load_model(T5EncoderModel, "text_encoder_3")
        encoder = SD3PromptEncoder(
            folder.load(CLIPTokenizer, "tokenizer"),
            folder.load_model(CLIPTextModelWithProjection, "text_encoder"),
            folder.load(CLIPTokenizer, "tokenizer_2"),
            folder.load_model(CLIPTextModelWithProjection, "text_encoder_2"),
            *t5,
            joint_attention_dim=config["joint_attention_dim"],
        )
        if encoder.pooled_dim != config["pooled_projection_dim"]:
            raise ValueError(
                f"{folder.source}: the CLIP encoders' projections sum to {encoder.pooled_dim}, but the transformer's "
                f"pooled_projection_dim is {config['pooled_projection_dim']}"
            )
        codec = LatentCodec(folder.load_model(AutoencoderKL, "vae"))
        return TeacherParts(folder.load_model(SD3Transformer2DModel, "transformer"), encoder, codec)

    def _load_sentence_encoded(self, folder: TeacherFolder, config: dict) -> TeacherParts:
        """One sentence encoder for both the text stream and the pooled projection; a VAE if the folder
        has one, else pixel space."""
        folder.need("tokenizer", why="an SD3 transformer with a sentence encoder")
        tokenizer, model = folder.load(AutoTokenizer, "tokenizer"), folder.load_model(AutoModel, "text_encoder")
        encoder = SentencePromptEncoder(tokenizer, model)
        for key in ("joint_attention_dim", "pooled_projection_dim"):
            if config[key] != encoder.pooled_dim:
                raise ValueError(
                    f"{folder.source}: the text encoder's states have {encoder.pooled_dim} channels, but the "
                    f"transformer's {key} is {config[key]}"
                )
        codec = LatentCodec(folder.load_model(AutoencoderKL, "vae")) if "vae" in folder.components else None
        return TeacherParts(folder.load_model(SD3Transformer2DModel, "transformer"), encoder, codec)

    def model_output(self, net: nn.Module, x_t: Tensor, timestep: Tensor, cond: Conditioning | None) -> Tensor:
        if cond is None or cond.prompt_embeds is None or cond.pooled is None:
            raise ValueError("SD3Transformer2DModel needs Conditioning.prompt_embeds and Conditioning.pooled")
        return net(
            hidden_states=x_t,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            timestep=timestep,
            return_dict=False,
        )[0]

    def image_tokens(self, output) -> Tensor:
        return joint_image_stream(output)

    def pipeline(self, net: nn.Module, scheduler, encoder: SD3PromptEncoder, vae: nn.Module):
        return StableDiffusion3Pipeline(
            transformer=net,
            scheduler=scheduler,
            vae=vae,
            text_encoder=encoder.text_encoder,
            tokenizer=encoder.tokenizers[0],
            text_encoder_2=encoder.text_encoder_2,
            tokenizer_2=encoder.tokenizers[1],
            text_encoder_3=encoder.text_encoder_3,  # None, None: saved as [null, null], as the teacher ran
            tokenizer_3=encoder.tokenizer_3,
        )
