"""Load a pretrained teacher ψ from a diffusers folder or hub id: UNet, schedule, prompt encoder, VAE.

Layouts: a diffusers pipeline folder (``model_index.json`` with ``unet/``, ``scheduler/`` and
optionally ``vae/``, ``text_encoder(_2)/``, ``tokenizer(_2)/``), or the same subfolders without
``model_index.json``. Which prompt encoder the teacher needs follows from ``unet/config.json``:

- ``UNet2DModel``: unconditional; ``num_class_embeds`` -> class labels; ``class_embed_type``
  "identity" -> a pooled sentence embedding from the text encoder in ``text_encoder/``.
- ``UNet2DConditionModel``: ``addition_embed_type`` "text_time" -> SDXL's two CLIP encoders;
  a CLIP ``text_encoder/`` -> SD 1.x/2.x; any other transformers encoder (e.g. BERT) -> sentence
  encoder, its pooled embedding also feeding ``class_embed_type`` "projection" if set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from workers.add.codec import LatentCodec
from workers.add.schedule import check_prediction_type
from workers.add.teacher import Teacher
from workers.add.text_encoders import (
    CLIPPromptEncoder,
    LabelPromptEncoder,
    SDXLPromptEncoder,
    SentencePromptEncoder,
)

UNET_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
REQUIRED_FILES = ("unet/config.json", "scheduler/scheduler_config.json")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_teacher(
    source: str | Path,
    *,
    prediction_type: str | None = None,
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Teacher:
    """The frozen teacher stored at ``source`` (a local folder, or a hub id read from the cache).

    ``prediction_type`` overrides the scheduler config's; ``resolution`` sets SDXL's time ids
    (default: the UNet's sample size times the VAE's downsampling).
    """
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    source = str(source)
    if _is_local(source):
        return _load(source, True, prediction_type, resolution, dtype).to(device)
    try:
        return _load(source, False, prediction_type, resolution, dtype).to(device)
    except OSError as err:  # hub errors (offline, not cached, no such repo) are OSErrors
        raise FileNotFoundError(
            f"cannot load the teacher {source!r}: it is not a local folder, and as a Hugging Face hub id it "
            f"could not be loaded (offline or not in the local cache?): {err}"
        ) from err


def _is_local(source: str) -> bool:
    path = Path(source).expanduser()
    if path.is_dir():
        return True
    if path.exists():
        raise ValueError(f"teacher source {source} is a file: expected a diffusers model folder or a hub id")
    if not HUB_ID.fullmatch(source):
        raise FileNotFoundError(f"teacher folder {source} does not exist")
    return False


def _components(source: str, local: bool) -> tuple[set[str], dict]:
    """Component names and the model_index.json entries (empty without one)."""
    if not local:
        index = DiffusionPipeline.load_config(source)
    else:
        root = Path(source)
        for name in REQUIRED_FILES:
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root} has no {name}: a teacher folder needs unet/ and scheduler/")
        if not (root / "model_index.json").is_file():
            return {p.name for p in root.iterdir() if p.is_dir()}, {}
        index = json.loads((root / "model_index.json").read_text())
    names = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    if local:
        missing = ", ".join(sorted(n for n in names if not (Path(source) / n).is_dir()))
        if missing:
            index_file = Path(source) / "model_index.json"
            raise FileNotFoundError(f"{index_file} lists {missing}, but {source} has no such folder")
    return names, index


TEXT_ENCODER_POINTER = "text_encoder.json"


def _text_encoder_package(source: str, local: bool) -> str | None:
    """The transformers folder named by ``text_encoder.json``: a text encoder too large to ship
    with the teacher, installed as a Python package ({"package": ..., "subfolder": ...})."""
    pointer = Path(source) / TEXT_ENCODER_POINTER
    if not local or not pointer.is_file():
        return None
    from workers.add.text_encoders import package_model_path

    spec = json.loads(pointer.read_text())
    return str(package_model_path(spec["package"], spec.get("subfolder", "model")))


def _load(source: str, local: bool, prediction_type, resolution, dtype) -> Teacher:
    components, index = _components(source, local)
    packaged = _text_encoder_package(source, local)
    if packaged is not None:
        components |= {"text_encoder", "tokenizer"}

    def load(cls, name: str, **kwargs):
        if packaged is not None and name in ("text_encoder", "tokenizer"):
            return cls.from_pretrained(packaged, local_files_only=True, **kwargs)
        return cls.from_pretrained(source, subfolder=name, local_files_only=local, **kwargs)

    def need(*names: str, why: str) -> None:
        missing = [n for n in names if n not in components]
        if missing:
            raise FileNotFoundError(f"{source} has no {', '.join(missing)}: {why} needs it")

    unet_config = UNet2DModel.load_config(source, subfolder="unet", local_files_only=local)
    unet_class = unet_config.get("_class_name")
    if unet_class not in UNET_CLASSES:
        raise ValueError(
            f"{source}: unet/config.json names the unsupported class {unet_class!r}; "
            f"supported are {', '.join(UNET_CLASSES)}"
        )
    scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=local))
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    codec = LatentCodec(load(AutoencoderKL, "vae", dtype=dtype)) if "vae" in components else None
    class_embed = unet_config.get("class_embed_type")

    if unet_class == "UNet2DModel":
        if unet_config.get("num_class_embeds") is not None:
            encoder = LabelPromptEncoder(unet_config["num_class_embeds"])
        elif class_embed is None:
            encoder = None
        elif class_embed == "identity":  # caption embedding added to the time embedding
            need("text_encoder", "tokenizer", why="a UNet2DModel with class_embed_type 'identity'")
            tokenizer, model = load(AutoTokenizer, "tokenizer"), load(AutoModel, "text_encoder", dtype=dtype)
            encoder = SentencePromptEncoder(tokenizer, model, as_class_labels=True, with_tokens=False)
        else:
            raise ValueError(f"{source}: UNet2DModel with class_embed_type {class_embed!r} is not supported")
    elif unet_config.get("addition_embed_type") == "text_time":
        need("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", why="an SDXL UNet (text_time)")
        if resolution is None:
            resolution = unet_config["sample_size"] * (codec.downsample_factor if codec else 1)
        encoder = SDXLPromptEncoder(
            load(CLIPTokenizer, "tokenizer"),
            load(CLIPTextModel, "text_encoder", dtype=dtype),
            load(CLIPTokenizer, "tokenizer_2"),
            load(CLIPTextModelWithProjection, "text_encoder_2", dtype=dtype),
            resolution=resolution,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
        )
    else:
        need("text_encoder", "tokenizer", why="a UNet2DConditionModel")
        text_config = (
            AutoConfig.from_pretrained(packaged)
            if packaged
            else AutoConfig.from_pretrained(source, subfolder="text_encoder", local_files_only=local)
        )
        if text_config.model_type.startswith("clip"):
            if class_embed is not None:
                raise ValueError(
                    f"{source}: class_embed_type {class_embed!r} with a CLIP encoder is not supported"
                )
            tokenizer, model = (
                load(CLIPTokenizer, "tokenizer"),
                load(CLIPTextModel, "text_encoder", dtype=dtype),
            )
            encoder = CLIPPromptEncoder(tokenizer, model)
        else:  # e.g. BERT; its pooled embedding also feeds class_embed_type "projection"
            tokenizer, model = load(AutoTokenizer, "tokenizer"), load(AutoModel, "text_encoder", dtype=dtype)
            encoder = SentencePromptEncoder(tokenizer, model, as_class_labels=class_embed is not None)
    return Teacher(load(UNET_CLASSES[unet_class], "unet", dtype=dtype), scheduler_config, encoder, codec)
