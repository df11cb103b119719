"""Tiny real models built in code, so no test downloads anything.

Every builder seeds torch itself, so the same call always gives the same weights. Pixel models
work on 16×16 images; the tiny VAE halves that to 8×8 latents with 4 channels.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Dinov2Config,
    Dinov2Model,
)

PIXEL_SIZE = 16  # images of every tiny model are 16×16
LATENT_SIZE = 8  # the tiny VAE downsamples by 2
TEXT_DIM = 32  # hidden size of every tiny text encoder
TEXT_LENGTH = 16  # tokenizer.model_max_length of the tiny CLIP tokenizer
NUM_CLASSES = 10  # the class-conditioned pixel UNet has NUM_CLASSES + 1 embeddings (last = null)
WORDS = ("a", "photo", "of", "sneaker", "shirt", "dress", "bag", "boot", "coat", "black", "white", "picture")


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """A DDPM scheduler config as SD ships it: scaled_linear betas, 1000 steps."""
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "clip_sample": False,
        "steps_offset": 1,
    }


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler.from_config(tiny_scheduler_config(prediction_type))


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer over letters and WORDS (CLIP's special tokens, short max length)."""
    letters = list(string.ascii_lowercase)
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    merges = []
    for word in WORDS:  # merge each word left to right into a single end-of-word token
        piece = word[0]
        for i, c in enumerate(word[1:], start=1):
            nxt = c + "</w>" if i == len(word) - 1 else c
            merges.append((piece, nxt))
            piece += nxt
            if piece not in tokens:
                tokens.append(piece)
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_LENGTH)


def tiny_bert_tokenizer():
    """A WordPiece BERT tokenizer over WORDS and single letters."""
    letters = list(string.ascii_lowercase)
    tokens = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *WORDS[1:],
        *letters,
        *("##" + c for c in letters),
    ]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=TEXT_LENGTH)


def _clip_config(tokenizer: CLIPTokenizer, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def tiny_clip_text_model(tokenizer: CLIPTokenizer, projection: bool = False):
    """CLIPTextModel (hidden 32, 2 layers), or CLIPTextModelWithProjection (projection dim 32)."""
    torch.manual_seed(1 if projection else 0)
    if projection:
        return CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=TEXT_DIM)).eval()
    return CLIPTextModel(_clip_config(tokenizer)).eval()


def tiny_bert_model(tokenizer) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    """AutoencoderKL with 4 latent channels that downsamples by 2 (16×16 pixels → 8×8 latents)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=PIXEL_SIZE,
    )


def _cond_unet(**kwargs) -> UNet2DConditionModel:
    torch.manual_seed(0)
    args = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": TEXT_DIM,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }
    return UNet2DConditionModel(**{**args, **kwargs})


def save_tiny_sd(path, prediction_type: str = "epsilon") -> Path:
    """A real StableDiffusionPipeline folder (tiny UNet, VAE, CLIP) saved at ``path``."""
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        unet=_cond_unet(),
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_tiny_sdxl(path, prediction_type: str = "epsilon") -> Path:
    """A real StableDiffusionXLPipeline folder: two CLIP encoders (the second with projection)."""
    tokenizer = tiny_clip_tokenizer()
    time_dim = 8
    unet = _cond_unet(
        cross_attention_dim=2 * TEXT_DIM,  # penultimate states of both encoders, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim,  # pooled + 6 time ids
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip_text_model(tokenizer),
        text_encoder_2=tiny_clip_text_model(tokenizer, projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_tiny_pixel_unet(path, conditioning: str = "none", prediction_type: str = "epsilon") -> Path:
    """unet/ + scheduler/ (no model_index.json) for a pixel-space UNet2DModel.

    ``conditioning``: ``none``; ``class`` (NUM_CLASSES + 1 label embeddings, the last one the null
    label); ``sentence`` (a pooled BERT caption embedding added to the time embedding through
    ``class_embed_type="identity"``, with text_encoder/ and tokenizer/ saved beside it).
    """
    if conditioning not in ("none", "class", "sentence"):
        raise ValueError(f"unknown conditioning {conditioning!r}")
    torch.manual_seed(0)
    extra = {
        "none": {},
        "class": {"num_class_embeds": NUM_CLASSES + 1},
        "sentence": {"class_embed_type": "identity", "time_embedding_dim": TEXT_DIM},
    }[conditioning]
    unet = UNet2DModel(
        sample_size=PIXEL_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        **extra,
    )
    path = Path(path)
    unet.save_pretrained(path / "unet")
    _scheduler(prediction_type).save_pretrained(path / "scheduler")
    if conditioning == "sentence":
        tokenizer = tiny_bert_tokenizer()
        tiny_bert_model(tokenizer).save_pretrained(path / "text_encoder")
        tokenizer.save_pretrained(path / "tokenizer")
    return path


def save_tiny_sentence_cond_unet(path, prediction_type: str = "epsilon") -> Path:
    """A pixel-space UNet2DConditionModel conditioned on a BERT encoder: cross-attention on its
    tokens and ``class_embed_type="projection"`` on its mean-pooled embedding (no VAE)."""
    tokenizer = tiny_bert_tokenizer()
    unet = _cond_unet(
        sample_size=PIXEL_SIZE,
        in_channels=3,
        out_channels=3,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=TEXT_DIM,
    )
    path = Path(path)
    unet.save_pretrained(path / "unet")
    _scheduler(prediction_type).save_pretrained(path / "scheduler")
    tiny_bert_model(tokenizer).save_pretrained(path / "text_encoder")
    tokenizer.save_pretrained(path / "tokenizer")
    return path


def tiny_dinov2() -> Dinov2Model:
    """A tiny DINOv2 ViT (hidden 32, 4 layers, patch 4, 32×32 input: 64 patch tokens + CLS)."""
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        patch_size=4,
        image_size=32,
    )
    return Dinov2Model(config).eval()


# ---- flow-matching transformer teachers (SD3, FLUX, Sana), each a real pipeline folder ----

T5_DIM = 64  # the tiny T5's width: SD3 pads its two 32-wide CLIP states (64) to it


def tiny_word_tokenizer(kind: str, max_length: int = TEXT_LENGTH):
    """A word-level fast tokenizer over WORDS with T5's (``"t5"``: ids then </s>) or Gemma's (``"gemma"``:
    <bos> then ids) special tokens; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {"t5": ["<pad>", "</s>", "<unk>"], "gemma": ["<pad>", "<eos>", "<bos>", "<unk>"]}[kind]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        names = {"eos_token": "</s>"}
    else:
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
        names = {"eos_token": "<eos>", "bos_token": "<bos>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", model_max_length=max_length, **names
    )


def tiny_t5(tokenizer, d_model: int = T5_DIM):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(2)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def tiny_gemma2(tokenizer):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(3)
    config = Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    return Gemma2Model(config).eval()


def tiny_flow_vae() -> AutoencoderKL:
    """The tiny AutoencoderKL with SD3's scaling and shift factors."""
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    return vae


def tiny_dc_vae():
    """A tiny AutoencoderDC (Sana's VAE): 4 latent channels, downsampling by 2."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    return AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=4,
        encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        scaling_factor=0.41407,
    ).eval()  # fmt: skip


def _flow_scheduler(**kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **kwargs)


def save_tiny_sd3(path, t5: bool = True) -> Path:
    """A real StableDiffusion3Pipeline folder: MMDiT (2 joint blocks, patch 2), CLIP-L, CLIP-G, T5 (or none)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_word_tokenizer("t5")
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_DIM,
        caption_projection_dim=16, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=8,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(shift=3.0),
        vae=tiny_flow_vae(),
        text_encoder=tiny_clip_text_model(tokenizer, projection=True),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_model(tokenizer, projection=True),
        tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(t5_tokenizer) if t5 else None,
        tokenizer_3=t5_tokenizer if t5 else None,
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_tiny_flux(path, guidance_embeds: bool = False) -> Path:
    """A real FluxPipeline folder: 1 double + 1 single block on 2×2-packed latents, CLIP and T5, the
    dynamic shift; ``guidance_embeds`` makes it guidance-distilled (FLUX.1-dev)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    tokenizer, t5_tokenizer = tiny_clip_tokenizer(), tiny_word_tokenizer("t5")
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    scheduler = _flow_scheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_flow_vae(),
        text_encoder=tiny_clip_text_model(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(t5_tokenizer, d_model=TEXT_DIM),
        tokenizer_2=t5_tokenizer,
    )
    pipe.save_pretrained(path)
    return Path(path)


def save_tiny_sana(path) -> Path:
    """A real SanaPipeline folder: 2 linear-attention blocks, Gemma-2, AutoencoderDC, Sana's flow DPM-Solver."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = tiny_word_tokenizer("gemma")
    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
        caption_channels=TEXT_DIM, sample_size=LATENT_SIZE, patch_size=1,
    )  # fmt: skip
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_gemma2(tokenizer),
        vae=tiny_dc_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return Path(path)
