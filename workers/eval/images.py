"""Prompts to images in [0, 1] for students and teachers of every kind, and images to PNG grids.

The common currency of the evaluator, the pyfunc model and ``generate``: float tensors
(N, C, H, W) in [0, 1], decoded through the teacher's VAE for latent models.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from workers.add.conditioning import Conditioning
from workers.add.families import family_of
from workers.add.sampler import sample_student, sample_teacher
from workers.add.student import Student
from workers.add.teacher import Teacher


def model_shape(teacher: Teacher, batch_size: int, resolution: int | None = None) -> tuple[int, ...]:
    """The shape x_t has for ``batch_size`` samples: latents for latent models, pixels otherwise, through
    the teacher's family (a FLUX network's input channels are the 2×2-packed latents', its config has no
    sample size). ``resolution`` (pixels) sets the size; default: the size the teacher was loaded for."""
    net, codec = teacher.unet, teacher.codec
    family = family_of(net)
    if family is None:
        raise ValueError(f"cannot tell the sample shape of a {type(net).__name__}: not a network of a known family")
    channels = family.sample_channels(net, codec)
    if resolution is not None:
        factor = codec.downsample_factor if codec is not None else 1
        if resolution % factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling {factor}")
        size = resolution // factor
    else:
        size = family.sample_size(net, teacher.image_seq_len)
        if size is None:
            raise ValueError(f"{type(net).__name__}'s config has no sample size: pass the resolution to sample at")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (batch_size, channels, h, w)


def conditioning(teacher: Teacher, prompts: list) -> Conditioning | None:
    """The prompts encoded for the teacher's (and student's) denoiser; ``None`` when unconditional."""
    return teacher.encode_prompts(list(prompts)) if teacher.prompt_encoder is not None else None


def to_pixels(teacher: Teacher, x0: Tensor) -> Tensor:
    """x0 in the model's space to images in [0, 1]."""
    pixels = teacher.codec.decode(x0) if teacher.codec is not None else x0
    return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def student_images(
    student: Student,
    parts: Teacher,
    prompts: list,
    steps: int = 1,
    generator: torch.Generator | None = None,
    noise: list[Tensor] | None = None,
) -> Tensor:
    """The student's ``steps``-step samples for ``prompts`` (one image each), in [0, 1]; ``noise``
    (``sample_student``'s) replaces the draws from ``generator``."""
    shape = model_shape(parts, len(prompts))
    x0 = sample_student(student, conditioning(parts, prompts), shape, steps, generator, noise=noise)
    return to_pixels(parts, x0)


@torch.no_grad()
def teacher_images(
    teacher: Teacher,
    prompts: list,
    steps: int = 50,
    guidance_scale: float = 1.0,
    solver: str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The teacher's reference samples (``solver``, ``steps`` steps, CFG) for ``prompts``, in [0, 1];
    ``solver`` None: the teacher's default (DDIM, or Euler for a flow teacher)."""
    x0 = sample_teacher(
        teacher,
        conditioning(teacher, prompts),
        model_shape(teacher, len(prompts)),
        steps=steps,
        solver=solver,
        guidance_scale=guidance_scale,
        generator=generator,
    )
    return to_pixels(teacher, x0)


def batched(fn, prompts: list, batch_size: int, desc: str | None = None) -> Tensor:
    """``fn(prompts[i:i + batch_size])`` over all prompts, concatenated; with ``desc``, a progress bar
    of that name on the console (``workers.console``)."""
    starts = range(0, len(prompts), batch_size)
    if desc is not None:
        from tqdm.auto import tqdm

        from workers.console import progress_stream

        starts = tqdm(starts, desc=desc, file=progress_stream(), dynamic_ncols=True)
    return torch.cat([fn(prompts[i : i + batch_size]) for i in starts])


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1] to (N, H, W, C) uint8; grayscale stays one channel."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def pil_image(image: np.ndarray) -> Image.Image:
    """One (H, W, C) uint8 image as PIL (mode L for one channel)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    pil_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def image_grid(images: Tensor | np.ndarray, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Images in a grid, row by row (``columns`` default: about square), with ``padding`` pixels between."""
    array = to_uint8(images) if isinstance(images, Tensor) else np.asarray(images)
    n, h, w, c = array.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, image in enumerate(array):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = image
    return pil_image(grid)
