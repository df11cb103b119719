"""The ADD models, objective and optimizers of a job, built from its TrainJob on one worker.

Every rank builds the same thing from the same seed, so the replicated parts (the heads φ) start
identical and the sharded ones (θ, ψ) hold the same full weights before FSDP splits them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from workers.add.balance import Balance
from workers.add.components import load_teacher
from workers.add.conditioning import Conditioning
from workers.add.discriminator import build_discriminator
from workers.add.families import family_of
from workers.add.losses import DistillationLoss, R1Penalty
from workers.add.step import ADDBatch, ADDModels, ADDObjective
from workers.add.student import Student, student_timesteps
from workers.add.teacher import Teacher
from workers.add.text_encoders import LabelPromptEncoder
from workers.train.config import TrainJob

EMBEDDING_PREFIX = "text_embedding_"  # columns added by workers.data.ingest.embed_captions


def build_objective(spec: TrainJob) -> ADDObjective:
    """ADDObjective from the job's loss section, with ``train.max_grad_norm`` (the one clip, ``Update``'s)."""
    loss = spec.loss
    return ADDObjective(
        distill=DistillationLoss(loss.weighting, w=loss.sds_w),
        r1=R1Penalty(gamma=loss.gamma_r1, interval=loss.r1_interval),
        lambda_distill=loss.lambda_distill,
        balance=Balance(loss.balance, lambda_adv=loss.lambda_adv, ratio=loss.adv_ratio),
        guidance_scale=loss.guidance_scale,
        distill_space=loss.distill_space,
        max_grad_norm=spec.train.max_grad_norm,
    )


def _student(spec: TrainJob, teacher: Teacher, network: torch.nn.Module | None = None) -> Student:
    s = spec.student
    T = teacher.schedule.num_train_timesteps
    timesteps = s.timesteps if s.timesteps is not None else student_timesteps(s.steps, T)
    return Student(
        teacher,
        timesteps=timesteps,
        zero_terminal_snr=s.zero_terminal_snr,
        network=network,
        lora_rank=s.lora_rank,
        lora_alpha=s.lora_alpha,
    )


def build_models(spec: TrainJob, device: torch.device, dinov2: torch.nn.Module | None = None) -> ADDModels:
    """ψ loaded from ``teacher.source``, θ copied from it, D on the chosen backbone; all on ``device``.

    ``dinov2``: an already built DINOv2 model (tests pass a tiny one) instead of ``discriminator.dinov2``.
    """
    torch.manual_seed(spec.train.seed)
    teacher = load_teacher(spec.teacher.source, device=device, **spec.teacher.load_kwargs())
    student = _student(spec, teacher).to(device)
    d = spec.discriminator
    cond_dim = teacher.prompt_encoder.pooled_dim if teacher.prompt_encoder is not None else 0
    D = build_discriminator(
        d.backbone,
        cond_dim=cond_dim,
        teacher=teacher,
        dinov2=dinov2 if dinov2 is not None else d.dinov2,
        taps=d.taps,
        cmap_dim=d.cmap_dim,
        image_conditioning=d.image_conditioning,
        augment_policy=d.augment_policy,
        resolution=d.resolution,
        t_hat_loc=d.t_hat_loc,
        t_hat_scale=d.t_hat_scale,
        text_rms=d.text_rms,
        mix_real_fake=d.mix_real_fake,
        minibatch_std=d.minibatch_std,
    ).to(device)
    return ADDModels(student, teacher, D)


def build_optimizers(spec: TrainJob, models: ADDModels) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """AdamW for θ and for φ (call after FSDP sharding: the optimizer must hold the DTensors)."""
    t = spec.train
    kwargs = {"betas": tuple(t.adam_betas), "weight_decay": t.weight_decay}
    opt_g = torch.optim.AdamW(models.student.trainable_parameters(), lr=t.lr_student, **kwargs)
    opt_d = torch.optim.AdamW(models.discriminator.trainable_parameters(), lr=t.lr_discriminator, **kwargs)
    return opt_g, opt_d


def student_lr(spec: TrainJob, step: int) -> float:
    """θ's learning rate at ``step`` (0-based): ``lr_student``, or its cosine decay to ``lr_student_final``
    over ``lr_student_decay_steps`` (default: the whole run), held there afterwards."""
    t = spec.train
    if t.lr_student_final is None:
        return t.lr_student
    span = t.lr_student_decay_steps or t.steps
    progress = min(step / span, 1.0)
    return t.lr_student_final + (t.lr_student - t.lr_student_final) * 0.5 * (1 + math.cos(math.pi * progress))


def set_student_lr(spec: TrainJob, opt_g: torch.optim.Optimizer, step: int) -> None:
    """Put θ's learning rate of ``step`` into its optimizer (the schedule is a function of the step alone,
    so a resumed run follows it exactly)."""
    for group in opt_g.param_groups:
        group["lr"] = student_lr(spec, step)


def set_hyperparameters(spec: TrainJob, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer) -> None:
    """The job spec wins over hyperparameters restored with an optimizer's state."""
    t = spec.train
    for optimizer, lr in ((opt_g, t.lr_student), (opt_d, t.lr_discriminator)):
        for group in optimizer.param_groups:
            group.update(lr=lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)


def batch_conditioning(teacher: Teacher, rows: dict[str, np.ndarray]) -> Conditioning:
    """c for a batch of data rows: pre-computed caption embeddings when the data carries them,
    else the teacher's prompt encoder on the captions (or on the labels, for class-conditioned
    teachers); an empty Conditioning for unconditional teachers."""
    encoder = teacher.prompt_encoder
    if encoder is None:
        return Conditioning()
    if isinstance(encoder, LabelPromptEncoder):
        labels = np.asarray(rows["label"])
        if (labels < 0).any():
            keys = [str(k) for k, label in zip(rows["key"], labels, strict=True) if label < 0][:3]
            raise ValueError(f"the teacher is class-conditioned but these records have no label: {keys}")
        return teacher.encode_prompts(labels.tolist())
    embedded = {k[len(EMBEDDING_PREFIX) :]: v for k, v in rows.items() if k.startswith(EMBEDDING_PREFIX)}
    if embedded:
        return Conditioning(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in embedded.items()})
    return teacher.encode_prompts([str(c) for c in rows["caption"]])


def caption_encoder(source: str, guidance: float | None = None):
    """The teacher's prompt encoder alone, for Ray Data's caption-embedding actors
    (``data.embed_captions``); its ``encode`` gives the Conditioning the loop reads back (with the
    embedded ``guidance`` of a guidance-distilled teacher: ``teacher.guidance``)."""
    encoder = load_teacher(source, guidance=guidance).prompt_encoder
    if encoder is None or isinstance(encoder, LabelPromptEncoder):
        kind = "unconditional" if encoder is None else "class-conditioned (it reads labels)"
        raise ValueError(f"data.embed_captions: the teacher {source} is {kind}: it has no captions to embed")
    return encoder


def make_batch(teacher: Teacher, rows: dict[str, np.ndarray], device: torch.device) -> ADDBatch:
    """ADDBatch from one micro-batch of ``workers.data.ingest`` rows (pixels in [-1, 1])."""
    pixels = torch.from_numpy(np.array(rows["pixels"], dtype=np.float32)).to(device)  # a writable copy
    cond = batch_conditioning(teacher, rows).to(device)
    return ADDBatch.from_pixels(teacher, pixels, cond)


def export_copy(spec: TrainJob, teacher: Teacher, full_state: dict[str, torch.Tensor]) -> Student:
    """An unsharded student holding ``full_state`` (a consolidated state dict), for export: its network built
    by the teacher's family (a diffusers UNet, SD3, FLUX or Sana transformer) from the teacher's config."""
    family = family_of(teacher.unet)
    if family is None:
        raise ValueError(
            f"cannot export a student of {type(teacher.unet).__name__}: not a network of a supported family"
        )
    config = dict(teacher.unet.config)
    # by the config's class name: FSDP2 swaps a sharded module's class for a subclass of it
    network_class = family.classes.get(config.get("_class_name"), type(teacher.unet))
    student = _student(spec, teacher, network=network_class.from_config(config))
    student.load_state_dict(full_state)
    return student.requires_grad_(False).eval()
