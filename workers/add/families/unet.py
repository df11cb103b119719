"""Diffusers UNets: pixel ``UNet2DModel`` (unconditional, class labels, a pooled caption) and
``UNet2DConditionModel`` (SD 1.x/2.x, SDXL, a sentence encoder).

Which prompt encoder follows from ``unet/config.json``:

- ``UNet2DModel``: ``num_class_embeds`` -> class labels; ``class_embed_type`` "identity" -> a pooled
  sentence embedding from the text encoder in ``text_encoder/``; neither -> unconditional.
- ``UNet2DConditionModel``: ``addition_embed_type`` "text_time" -> SDXL's two CLIP encoders; a CLIP
  ``text_encoder/`` -> SD 1.x/2.x; any other transformers encoder (e.g. BERT) -> sentence encoder,
  its pooled embedding also feeding ``class_embed_type`` "projection" if set.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from workers.add.codec import LatentCodec
from workers.add.conditioning import Conditioning
from workers.add.families.base import Family, TeacherFolder, TeacherParts
from workers.add.text_encoders import CLIPPromptEncoder, LabelPromptEncoder, SDXLPromptEncoder, SentencePromptEncoder


def unet_inputs(unet: nn.Module, cond: Conditioning | None) -> dict:
    """The keyword arguments a diffusers UNet takes for this conditioning, checked for what it needs."""
    config = unet.config
    if isinstance(unet, UNet2DModel):
        needs_labels = config.get("num_class_embeds") is not None or config.get("class_embed_type")
        if needs_labels and (cond is None or cond.class_labels is None):
            raise ValueError("this UNet2DModel is class-conditioned: Conditioning.class_labels is required")
        return {"class_labels": cond.class_labels if needs_labels else None}
    if cond is None or cond.prompt_embeds is None:
        raise ValueError("UNet2DConditionModel needs Conditioning.prompt_embeds (encoder_hidden_states)")
    kwargs = {"encoder_hidden_states": cond.prompt_embeds, "class_labels": cond.class_labels}
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text and time ids
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("an SDXL UNet needs Conditioning.pooled (text_embeds) and Conditioning.time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return kwargs


class UNetFamily(Family):
    name = "unet"
    folder = "unet"
    classes = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
    # attention and feed-forward projections of the transformer blocks inside the UNet
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

    def load(
        self, folder: TeacherFolder, config: dict, *, resolution: int | None, guidance: float | None
    ) -> TeacherParts:
        unet_class = config["_class_name"]
        codec = LatentCodec(folder.load_model(AutoencoderKL, "vae")) if "vae" in folder.components else None
        class_embed = config.get("class_embed_type")
        if unet_class == "UNet2DModel":
            if config.get("num_class_embeds") is not None:
                encoder = LabelPromptEncoder(config["num_class_embeds"])
            elif class_embed is None:
                encoder = None
            elif class_embed == "identity":  # caption embedding added to the time embedding
                folder.need("text_encoder", "tokenizer", why="a UNet2DModel with class_embed_type 'identity'")
                tokenizer, model = folder.load(AutoTokenizer, "tokenizer"), folder.load_model(AutoModel, "text_encoder")
                encoder = SentencePromptEncoder(tokenizer, model, as_class_labels=True, with_tokens=False)
            else:
                raise ValueError(f"{folder.source}: UNet2DModel with class_embed_type {class_embed!r} is not supported")
        elif config.get("addition_embed_type") == "text_time":
            folder.need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", why="an SDXL UNet (text_time)")
            if resolution is None:
                resolution = config["sample_size"] * (codec.downsample_factor if codec else 1)
            encoder = SDXLPromptEncoder(
                folder.load(CLIPTokenizer, "tokenizer"),
                folder.load_model(CLIPTextModel, "text_encoder"),
                folder.load(CLIPTokenizer, "tokenizer_2"),
                folder.load_model(CLIPTextModelWithProjection, "text_encoder_2"),
                resolution=resolution,
                force_zeros_for_empty_prompt=folder.index.get("force_zeros_for_empty_prompt", True),
            )
        else:
            folder.need("text_encoder", "tokenizer", why="a UNet2DConditionModel")
            model_type = folder.model_type("text_encoder")
            if model_type.startswith("clip"):
                if class_embed is not None:
                    raise ValueError(
                        f"{folder.source}: class_embed_type {class_embed!r} with a CLIP encoder is not supported"
                    )
                encoder = CLIPPromptEncoder(
                    folder.load(CLIPTokenizer, "tokenizer"), folder.load_model(CLIPTextModel, "text_encoder")
                )
            else:  # e.g. BERT; its pooled embedding also feeds class_embed_type "projection"
                tokenizer, model = folder.load(AutoTokenizer, "tokenizer"), folder.load_model(AutoModel, "text_encoder")
                encoder = SentencePromptEncoder(tokenizer, model, as_class_labels=class_embed is not None)
        return TeacherParts(folder.load_model(self.classes[unet_class], "unet"), encoder, codec)

    def model_output(self, net: nn.Module, x_t: Tensor, timestep: Tensor, cond: Conditioning | None) -> Tensor:
        return net(x_t, timestep, **unet_inputs(net, cond), return_dict=False)[0]

    def blocks(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        """Each down block, the mid block, each up block."""
        named = [(f"down_blocks.{i}", b) for i, b in enumerate(getattr(net, "down_blocks", []))]
        if getattr(net, "mid_block", None) is not None:
            named.append(("mid_block", net.mid_block))
        return named + [(f"up_blocks.{i}", b) for i, b in enumerate(getattr(net, "up_blocks", []))]

    def default_taps(self, net: nn.Module) -> list[str]:
        """Each down block and the mid block."""
        return [name for name, _ in self.blocks(net) if not name.startswith("up_blocks")]

    def tap_channels(self, net: nn.Module, name: str) -> int:
        """Channels of a block's output, read from its last resnet (or its own attribute)."""
        module = net.get_submodule(name)
        resnets = getattr(module, "resnets", None)
        if resnets:
            return resnets[-1].out_channels
        if isinstance(getattr(module, "out_channels", None), int):
            return module.out_channels
        raise ValueError(f"cannot tell the output channels of teacher module {name!r}: tap a down, mid or up block")

    def tap_grid(self, net: nn.Module, output, x: Tensor) -> Tensor:
        """Down blocks return (hidden state, skip connections): the hidden state."""
        return output[0] if isinstance(output, tuple) else output
