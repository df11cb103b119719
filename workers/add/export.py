"""Export the student as a diffusers folder and load it back.

The folder holds the student's network (LoRA merged into the weights: no adapter to load), a
scheduler that samples as ``sample_student`` does, and the teacher's frozen parts (text encoders,
tokenizers, VAE). For SD, SDXL, SD3 / SD3.5, FLUX.1 and Sana teachers it is the family's own
pipeline folder, which ``DiffusionPipeline.from_pretrained`` loads and samples without guidance.

UNet students: diffusers' ``LCMScheduler``. Its step is exactly the student's ancestral scheme
(predict x0, re-noise it with fresh noise to the next timestep), and with
``original_inference_steps = N`` its timesteps for 1..N steps are the student's (trailing
spacing). Its ``trained_betas`` carry the student's zero-terminal-SNR schedule exactly:
``pipe(prompt, num_inference_steps=n, guidance_scale=0.0)``.

Flow students (SD3, FLUX, Sana): ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)`` at the
student's static shift (FLUX's resolution-dependent shift frozen at the training resolution's e^μ).
Its step is the ancestral scheme on the flow path: x0 = x − σ·v, then (1 − σ')·x0 + σ'·ε. No flow
scheduler of diffusers picks timesteps LCM-style (``FlowMatchLCMScheduler`` spaces them like Euler):
their n-step grids end at a σ fixed by the config, while the student's every-(N//n)-th grid ends at
one that depends on n. So ``num_inference_steps`` alone gives the student's sigmas only where the
pipeline's own spacing meets them: n = 1 always, and for FLUX (whose pipeline asks for
linspace(1, 1/n, n)) every n that divides N of trailing student timesteps. For every n the pipeline
visits them exactly when given ``sigmas=pipeline_sigmas(folder, n)`` (the unshifted (τ+1)/T, stored in
``add_student.json``; the scheduler applies the shift):
``pipe(prompt, num_inference_steps=n, sigmas=..., guidance_scale=1.0)``, and for a guidance-distilled
FLUX ``guidance_scale`` = the embedded guidance it was trained with (``add_student.json``'s ``guidance``).
Noise: every pipeline draws x at σ = 1 from its ``generator`` as ``sample_student`` does; ``SanaPipeline``
also passes it to the scheduler's step, so its re-noising is the same generator's next draws, while
``StableDiffusion3Pipeline`` and ``FluxPipeline`` call ``step`` without it (the global torch generator,
FLUX's in the packed token layout): beyond one step their images equal ``sample_student``'s given that noise.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from diffusers import (
    DDPMPipeline,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)

from workers.add.components import load_teacher
from workers.add.families import family_of
from workers.add.sampler import sampling_timesteps
from workers.add.student import Student
from workers.add.teacher import Teacher
from workers.add.text_encoders import (
    CLIPPromptEncoder,
    SDXLPromptEncoder,
    SentencePromptEncoder,
)
from workers.data.storage import atomic_write

STUDENT_FILE = "add_student.json"


def student_scheduler(student: Student) -> LCMScheduler | FlowMatchEulerDiscreteScheduler:
    """The scheduler that samples as ``sample_student`` does: ``LCMScheduler`` over a DDPM student's ᾱ_t,
    ``flow_student_scheduler`` for a flow student."""
    if student.schedule.is_flow:
        return flow_student_scheduler(student)
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


def flow_student_scheduler(student: Student) -> FlowMatchEulerDiscreteScheduler:
    """Euler with ``stochastic_sampling``: x0 = x − σ·v, then (1 − σ')·x0 + σ'·ε, the student's ancestral
    step, on σ = shift(u) with the student's own shift, static (a FLUX student's e^μ frozen in)."""
    schedule = student.schedule
    if schedule.prediction_type != "flow":
        raise ValueError(
            f"a flow student predicting {schedule.prediction_type!r} cannot be exported: the family pipelines "
            "read the transformer's output as the velocity (prediction type 'flow')"
        )
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift, stochastic_sampling=True
    )


def flow_pipeline_sigmas(student: Student) -> dict[str, list[float]]:
    """For n = 1..N, the ``sigmas`` a flow pipeline takes to visit the n-step student timesteps: u = (τ+1)/T
    unshifted, since the scheduler shifts what it is given (σ_τ = shift((τ+1)/T), ``FlowMatchSchedule``)."""
    timesteps, T = student.timesteps.tolist(), student.schedule.num_train_timesteps
    return {str(n): [(t + 1) / T for t in sampling_timesteps(timesteps, n)] for n in range(1, len(timesteps) + 1)}


def pipeline_sigmas(path: str | Path, steps: int) -> list[float] | None:
    """``sigmas`` for ``pipe(prompt, num_inference_steps=steps, sigmas=...)`` of an exported flow student
    (None for a UNet student: its LCMScheduler needs none)."""
    info = json.loads((Path(path) / STUDENT_FILE).read_text())
    sigmas = info.get("pipeline_sigmas")
    if sigmas is None:
        return None
    if str(steps) not in sigmas:
        raise ValueError(f"the student samples in 1..{len(sigmas)} steps, got {steps}")
    return sigmas[str(steps)]


def merged_unet(student: Student) -> torch.nn.Module:
    """A copy of the student's network with LoRA adapters folded into the base weights."""
    unet = copy.deepcopy(student.unet)
    if student.lora_rank is not None:
        unet.fuse_lora()
        unet.unload_lora()
    return unet.requires_grad_(False)


def export_student(student: Student, teacher: Teacher, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the student to ``path`` atomically: a complete folder or none at all."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"export folder {path} already exists: refusing to overwrite it")
    unet, scheduler = merged_unet(student), student_scheduler(student)
    info = {"student_timesteps": student.timesteps.tolist(), "lora_rank": student.lora_rank}
    if student.schedule.is_flow:
        info["pipeline_sigmas"] = flow_pipeline_sigmas(student)
        if teacher.image_seq_len is not None:  # FLUX: its shift and size follow the resolution it trained at
            side = family_of(teacher.unet).sample_size(teacher.unet, teacher.image_seq_len)
            info["resolution"] = int(side) * teacher.codec.downsample_factor
        guidance = getattr(teacher.prompt_encoder, "guidance", None)
        if guidance is not None:  # a guidance-distilled FLUX: the pipeline's guidance_scale must be this one
            info["guidance"] = guidance
    elif [int(t) for t in _scheduler_timesteps(scheduler)] != student.timesteps.tolist():
        raise ValueError(
            f"student timesteps {student.timesteps.tolist()} are not trailing-spaced: LCMScheduler "
            "would sample others; use trailing spacing to export"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    info |= metadata or {}

    def write(tmp: Path) -> None:
        tmp.mkdir()
        _save(unet, scheduler, teacher, tmp)
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2))

    atomic_write(path, write)
    return path


def _scheduler_timesteps(scheduler: LCMScheduler) -> list[int]:
    scheduler.set_timesteps(scheduler.config.original_inference_steps)
    return scheduler.timesteps.tolist()


def _save(unet, scheduler, teacher: Teacher, folder: Path) -> None:
    encoder, codec = teacher.prompt_encoder, teacher.codec
    vae = codec.vae if codec is not None else None
    if isinstance(encoder, SentencePromptEncoder):
        # a sentence encoder has no diffusers pipeline (the benchmark's pixel UNet and MMDiT): the
        # layout load_teacher reads, the network under its family's folder
        unet.save_pretrained(folder / family_of(unet).folder)
        scheduler.save_pretrained(folder / "scheduler")
        if vae is not None:
            vae.save_pretrained(folder / "vae")
        encoder.model.save_pretrained(folder / "text_encoder")
        encoder.tokenizer.save_pretrained(folder / "tokenizer")  # with the token count it pads to
    elif isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        # the family's own pipeline around the student's transformer and the teacher's frozen parts
        family_of(unet).pipeline(unet, scheduler, encoder, vae).save_pretrained(folder)
    elif isinstance(unet, UNet2DConditionModel) and isinstance(encoder, SDXLPromptEncoder) and vae is not None:
        StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoder.text_encoder,
            text_encoder_2=encoder.text_encoder_2,
            tokenizer=encoder.tokenizers[0],
            tokenizer_2=encoder.tokenizers[1],
            unet=unet,
            scheduler=scheduler,
        ).save_pretrained(folder)
    elif isinstance(unet, UNet2DConditionModel) and isinstance(encoder, CLIPPromptEncoder) and vae is not None:
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
    else:  # other conditioned pixel models (class labels): the same layout load_teacher reads
        unet.save_pretrained(folder / "unet")
        scheduler.save_pretrained(folder / "scheduler")
        if vae is not None:
            vae.save_pretrained(folder / "vae")


def load_student(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[Student, Teacher]:
    """Load an exported student for sampling; returns it with the frozen parts it needs."""
    path = Path(path)
    info_file = path / STUDENT_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{path} is not an exported ADD student: {STUDENT_FILE} is missing")
    info = json.loads(info_file.read_text())
    # a guidance-distilled FLUX student reads the guidance it was trained with, not the loader's default
    # and a FLUX student the resolution it was trained at (the loader's default is the VAE's, 1024)
    parts = load_teacher(
        str(path), dtype=dtype, device=device, guidance=info.get("guidance"), resolution=info.get("resolution")
    )
    student = Student(parts, timesteps=info["student_timesteps"], zero_terminal_snr=False)
    return student.requires_grad_(False).eval(), parts
