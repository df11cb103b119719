"""What a model family is: how to load its folder, call its network, tap it, shard it and adapt it.

A family is one small class per network architecture (a diffusers UNet, SD3's MMDiT, FLUX, Sana).
Everything else in the project (teacher, student, LADD features, FSDP, LoRA) talks to the family,
never to a network's keyword arguments or module names. Adding a family is one file that subclasses
``Family`` and one line in ``workers.add.families.FAMILIES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from workers.add.conditioning import Conditioning


@dataclass
class TeacherFolder:
    """One teacher's folder (or hub id) as its family's loader reads it."""

    source: str
    local: bool
    components: set[str]  # subfolders present (or listed by model_index.json)
    index: dict = field(default_factory=dict)  # model_index.json, empty without one
    packaged_text_encoder: str | None = None  # a transformers folder named by text_encoder.json
    dtype: torch.dtype = torch.float32
    packaged_max_length: int | None = None  # text_encoder.json's "max_length": the tokens the teacher reads

    def load(self, cls, name: str, **kwargs):
        """``cls.from_pretrained`` of the subfolder ``name``, in the folder's dtype for models."""
        if self.packaged_text_encoder is not None and name in ("text_encoder", "tokenizer"):
            if name == "tokenizer" and self.packaged_max_length:
                kwargs = {"model_max_length": self.packaged_max_length, **kwargs}
            return cls.from_pretrained(self.packaged_text_encoder, local_files_only=True, **kwargs)
        return cls.from_pretrained(self.source, subfolder=name, local_files_only=self.local, **kwargs)

    def load_model(self, cls, name: str):
        return self.load(cls, name, dtype=self.dtype)

    def need(self, *names: str, why: str) -> None:
        """Refuse the folder, naming what is missing and who needs it."""
        missing = [n for n in names if n not in self.components]
        if missing:
            raise FileNotFoundError(f"{self.source} has no {', '.join(missing)}: {why} needs it")

    def explicitly_absent(self, name: str) -> bool:
        """``model_index.json`` lists ``name`` as [null, null]: the pipeline runs without it on purpose."""
        entry = self.index.get(name)
        return isinstance(entry, list) and bool(entry) and entry[0] is None

    def model_type(self, name: str) -> str:
        """The transformers ``model_type`` of a subfolder's config.json ("clip_text_model", "t5", "gemma2")."""
        if self.packaged_text_encoder is not None and name == "text_encoder":
            return AutoConfig.from_pretrained(self.packaged_text_encoder).model_type
        if self.local:
            path = Path(self.source) / name / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{self.source} has no {name}/config.json")
        return AutoConfig.from_pretrained(self.source, subfolder=name, local_files_only=self.local).model_type

    def expect_model_type(self, name: str, expected: str, why: str) -> None:
        """Refuse the folder if ``name`` is not the family's kind of text encoder (e.g. FLUX's set under SD3)."""
        model_type = self.model_type(name)
        if model_type != expected:
            raise ValueError(f"{self.source}: {name} is a {model_type!r} model, but {why} needs a {expected!r} one")


@dataclass
class TeacherParts:
    """What a family's loader returns; ``load_teacher`` wraps it in a ``Teacher``."""

    net: nn.Module
    prompt_encoder: nn.Module | None
    codec: nn.Module | None
    image_seq_len: int | None = None  # the token count a resolution-shifted schedule (FLUX) needs


class Family:
    """One architecture. Subclasses set the class attributes and implement the methods."""

    name: str
    folder: str  # the pipeline subfolder that holds the network: "unet" or "transformer"
    classes: dict[str, type]  # diffusers class name -> class
    lora_targets: tuple[str, ...]  # module-name suffixes where LoRA adapters go by default

    def owns(self, net: nn.Module) -> bool:
        return isinstance(net, tuple(self.classes.values()))

    def load(
        self, folder: TeacherFolder, config: dict, *, resolution: int | None, guidance: float | None
    ) -> TeacherParts:
        """The network, its prompt encoder and its latent codec from ``folder`` (``config``: the network's)."""
        raise NotImplementedError

    def scheduler_config(self, config: dict) -> dict:
        """The scheduler config as ``schedule_from_scheduler_config`` reads it (a family may translate it)."""
        return config

    def model_output(self, net: nn.Module, x_t: Tensor, timestep: Tensor, cond: Conditioning | None) -> Tensor:
        """The network's raw output (B, C, H, W) at x_t (B, C, H, W); ``timestep`` as the network takes it."""
        raise NotImplementedError

    def sample_channels(self, net: nn.Module, codec: nn.Module | None) -> int:
        """Channels of x_t: the codec's latent channels for a latent teacher (not the network's input
        channels: FLUX packs 2×2 latent patches into them), else the network's."""
        return int(codec.latent_channels) if codec is not None else int(net.config.in_channels)

    def sample_size(self, net: nn.Module, image_seq_len: int | None) -> int | tuple[int, int] | None:
        """The side (or height, width) of x_t the network was loaded for (latent pixels for a latent
        teacher); None when its config does not say (then the caller's resolution decides)."""
        return net.config.get("sample_size")

    def guidance_embedded(self, net: nn.Module) -> bool:
        """Whether the network takes the guidance scale as an input (then the teacher runs no CFG)."""
        return False

    def blocks(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        """Named blocks in forward order: FSDP's units and the candidate LADD taps."""
        raise NotImplementedError

    def default_taps(self, net: nn.Module) -> list[str]:
        """LADD taps when none are configured."""
        raise NotImplementedError

    def tap_channels(self, net: nn.Module, name: str) -> int:
        """Channels of the feature grid a tap gives."""
        raise NotImplementedError

    def tap_grid(self, net: nn.Module, output, x: Tensor) -> Tensor:
        """A tapped block's output as a feature grid (B, C, h, w) for the 2-D heads (x: the network's input)."""
        raise NotImplementedError

    def pipeline(self, net: nn.Module, scheduler, encoder: nn.Module, vae: nn.Module):
        """The family's own diffusers pipeline around a student's network and the teacher's frozen parts
        (its export); a family without one cannot be exported as a pipeline."""
        raise ValueError(f"no diffusers pipeline to export a {type(net).__name__} student as ({self.name})")


class TransformerFamily(Family):
    """Diffusion transformers: blocks in ``block_lists``, image tokens on a (H/p, W/p) grid."""

    folder = "transformer"
    block_lists: tuple[str, ...] = ("transformer_blocks",)
    num_default_taps = 4

    def blocks(self, net: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{attr}.{i}", b) for attr in self.block_lists for i, b in enumerate(getattr(net, attr, []))]

    def default_taps(self, net: nn.Module) -> list[str]:
        """``num_default_taps`` blocks spread evenly over the whole stack, the last one included (ours)."""
        names = [name for name, _ in self.blocks(net)]
        k = min(self.num_default_taps, len(names))
        return [names[len(names) * (i + 1) // k - 1] for i in range(k)]

    def tap_channels(self, net: nn.Module, name: str) -> int:
        return int(net.config.num_attention_heads * net.config.attention_head_dim)

    def patch_size(self, net: nn.Module) -> int:
        """Latent pixels per token side."""
        return int(net.config.patch_size)

    def image_tokens(self, output) -> Tensor:
        """The image stream of a block's output (B, N, D)."""
        return output

    def tap_grid(self, net: nn.Module, output, x: Tensor) -> Tensor:
        tokens = self.image_tokens(output)
        p = self.patch_size(net)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        # tokens are the patches in row-major order (PatchEmbed's flatten, FLUX's packing)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def joint_image_stream(output) -> Tensor:
    """SD3's and FLUX's joint blocks return (encoder_hidden_states, hidden_states): the image is second."""
    return output[1]
