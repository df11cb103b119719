"""Export the student as a diffusers folder and load it back.

The folder holds the student's UNet (LoRA merged), a scheduler whose betas and timesteps are the
student's, and the teacher's frozen parts (text encoders, tokenizers, VAE). For SD- and
SDXL-type teachers it is a whole pipeline that ``DiffusionPipeline.from_pretrained`` loads and
samples in one step (``pipe(prompt, num_inference_steps=1, guidance_scale=0.0)``).

The scheduler is diffusers' ``LCMScheduler``: its step is exactly the student's ancestral scheme
(predict x0, re-noise it with fresh noise to the next timestep), and with
``original_inference_steps = N`` its timesteps for 1..N steps are the student's (trailing
spacing). Its ``trained_betas`` carry the student's zero-terminal-SNR schedule exactly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import (
    DDPMPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from workers.add.components import load_teacher
from workers.add.student import Student
from workers.add.teacher import Teacher
from workers.add.text_encoders import CLIPPromptEncoder, SDXLPromptEncoder, SentencePromptEncoder
from workers.data.storage import atomic_write

STUDENT_FILE = "add_student.json"


def student_scheduler(student: Student) -> LCMScheduler:
    """An LCMScheduler over the student's own ᾱ_t whose 1..N-step timesteps are T_student's."""
    alpha_bar = student.schedule.alpha_bar
    betas = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    n = len(student.timesteps)
    return LCMScheduler(
        num_train_timesteps=student.schedule.num_train_timesteps,
        trained_betas=betas.tolist(),
        original_inference_steps=n,
        prediction_type=student.schedule.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        steps_offset=1,  # unused by LCM; SD pipelines warn about any other value
    )


def merged_unet(student: Student) -> torch.nn.Module:
    """A copy of the student's UNet with LoRA adapters folded into the base weights."""
    unet = copy.deepcopy(student.unet)
    if student.lora_rank is not None:
        unet.fuse_lora()
        unet.unload_lora()
    return unet.requires_grad_(False)


def export_student(
    student: Student, teacher: Teacher, path: str | Path, metadata: dict | None = None
) -> Path:
    """Write the student to ``path`` atomically: a complete folder or none at all."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"export folder {path} already exists: refusing to overwrite it")
    unet, scheduler = merged_unet(student), student_scheduler(student)
    if [int(t) for t in _scheduler_timesteps(scheduler)] != student.timesteps.tolist():
        raise ValueError(
            f"student timesteps {student.timesteps.tolist()} are not trailing-spaced: LCMScheduler "
            "would sample others; use trailing spacing to export"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"student_timesteps": student.timesteps.tolist(), "lora_rank": student.lora_rank, **(metadata or {})}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        _save(unet, scheduler, teacher, tmp)
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2))

    atomic_write(path, write)
    return path


def _scheduler_timesteps(scheduler: LCMScheduler) -> list[int]:
    scheduler.set_timesteps(scheduler.config.original_inference_steps)
    return scheduler.timesteps.tolist()


def _save(unet, scheduler: LCMScheduler, teacher: Teacher, folder: Path) -> None:
    encoder, codec = teacher.prompt_encoder, teacher.codec
    vae = codec.vae if codec is not None else None
    if isinstance(unet, UNet2DConditionModel) and isinstance(encoder, SDXLPromptEncoder) and vae is not None:
        StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoder.text_encoder,
            text_encoder_2=encoder.text_encoder_2,
            tokenizer=encoder.tokenizers[0],
            tokenizer_2=encoder.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        ).save_pretrained(folder)
    elif (
        isinstance(unet, UNet2DConditionModel) and isinstance(encoder, CLIPPromptEncoder) and vae is not None
    ):
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoder.text_encoder,
            tokenizer=encoder.tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(folder)
    elif isinstance(unet, UNet2DModel) and encoder is None:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    else:  # conditioned pixel models: the same layout load_teacher reads, no pipeline class
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        if vae is not None:
            vae.save_pretrained(folder / "vae")
        if isinstance(encoder, SentencePromptEncoder):
            encoder.model.save_pretrained(folder / "text_encoder")
            encoder.tokenizer.save_pretrained(folder / "tokenizer")


def load_student(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Student, Teacher]:
    """Load an exported student for sampling; returns it with the frozen parts it needs."""
    path = Path(path)
    info_file = path / STUDENT_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{path} is not an exported ADD student: {STUDENT_FILE} is missing")
    info = json.loads(info_file.read_text())
    parts = load_teacher(str(path), dtype=dtype, device=device)
    student = Student(parts, timesteps=info["student_timesteps"], zero_terminal_snr=False)
    return student.requires_grad_(False).eval(), parts
