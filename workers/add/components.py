"""Load a pretrained teacher ψ from a diffusers folder or hub id: network, schedule, prompt encoder, VAE.

Layouts: a diffusers pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/``,
``scheduler/`` and the family's ``vae/``, ``text_encoder(_2, _3)/``, ``tokenizer(_2, _3)/``), or the same
subfolders without ``model_index.json``. The network's ``_class_name`` picks the family
(``workers.add.families``: diffusers UNets, SD3 / SD3.5, FLUX.1, Sana), which loads the rest and refuses
a folder whose pieces do not fit it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

from workers.add.families import NETWORK_FOLDERS, TeacherFolder, family_for
from workers.add.teacher import Teacher

SCHEDULER_FILE = "scheduler/scheduler_config.json"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_teacher(
    source: str | Path,
    *,
    prediction_type: str | None = None,
    resolution: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    guidance: float | None = None,
) -> Teacher:
    """The frozen teacher stored at ``source`` (a local folder, or a hub id read from the cache).

    ``prediction_type`` overrides the scheduler config's; ``resolution`` (pixels) sets SDXL's time ids
    (default: the UNet's sample size times the VAE's downsampling) and FLUX's resolution-dependent
    shift (default: the VAE's sample size); ``guidance`` is the scale a guidance-distilled FLUX takes as an
    input (default 3.5, FluxPipeline's).
    """
    source = str(source)
    if _is_local(source):
        return _load(source, True, prediction_type, resolution, dtype, guidance).to(device)
    try:
        return _load(source, False, prediction_type, resolution, dtype, guidance).to(device)
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
        if not any((root / name / "config.json").is_file() for name in NETWORK_FOLDERS):
            files = " or ".join(f"{name}/config.json" for name in NETWORK_FOLDERS)
            raise FileNotFoundError(
                f"{root} has no {files}: a teacher folder needs unet/ (or transformer/) and scheduler/"
            )
        if not (root / SCHEDULER_FILE).is_file():
            raise FileNotFoundError(
                f"{root} has no {SCHEDULER_FILE}: a teacher folder needs unet/ (or transformer/) and scheduler/"
            )
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


def _text_encoder_package(source: str, local: bool) -> tuple[str | None, int | None]:
    """The transformers folder named by ``text_encoder.json``: a text encoder too large to ship
    with the teacher, installed as a Python package ({"package": ..., "subfolder": ...}), and the
    token count a teacher reading its tokens pads captions to ("max_length", optional)."""
    pointer = Path(source) / TEXT_ENCODER_POINTER
    if not local or not pointer.is_file():
        return None, None
    from workers.add.text_encoders import package_model_path

    spec = json.loads(pointer.read_text())
    return str(package_model_path(spec["package"], spec.get("subfolder", "model"))), spec.get("max_length")


def _load(source: str, local: bool, prediction_type, resolution, dtype, guidance) -> Teacher:
    components, index = _components(source, local)
    packaged, max_length = _text_encoder_package(source, local)
    if packaged is not None:
        components |= {"text_encoder", "tokenizer"}
    folder = TeacherFolder(source, local, components, index, packaged, dtype, max_length)
    network = next((name for name in NETWORK_FOLDERS if name in components), None)
    if network is None:
        raise FileNotFoundError(f"{source} has no {' or '.join(NETWORK_FOLDERS)}: a teacher needs its network")
    # any diffusers model class reads a config.json; the class it names picks the family
    config = dict(UNet2DModel.load_config(source, subfolder=network, local_files_only=local))
    family = family_for(network, config.get("_class_name"), source)
    if guidance is not None and not config.get("guidance_embeds"):
        raise ValueError(
            f"{source}: guidance {guidance} is an input of guidance-distilled networks (FLUX.1-dev), but this "
            f"{config['_class_name']} has no guidance embedding (guidance_embeds is not set)"
        )
    scheduler_config = dict(DDPMScheduler.load_config(source, subfolder="scheduler", local_files_only=local))
    scheduler_config = family.scheduler_config(scheduler_config)
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    parts = family.load(folder, config, resolution=resolution, guidance=guidance)
    return Teacher(parts.net, scheduler_config, parts.prompt_encoder, parts.codec, image_seq_len=parts.image_seq_len)
