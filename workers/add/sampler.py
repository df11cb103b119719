"""Samplers: the student's few-step ancestral sampler and the teacher's reference samplers.

One contract (as k-diffusion's samplers share one signature): ``sample_*(model, cond, shape, steps,
generator, *, options)``, positional up to the generator, each sampler's own settings by keyword only.
All return x0 in the model's space (latents for latent models); decode with ``teacher.codec``.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import Tensor
from tqdm.auto import tqdm

from workers.add.conditioning import Conditioning
from workers.add.student import Student
from workers.add.teacher import Teacher

TEACHER_SOLVERS = ("ddim", "dpmpp")


def _placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's first parameter (CPU float32 for a parameter-free one)."""
    param = next(module.parameters(), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def _noise(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    return torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(device, dtype)


def sampling_timesteps(student_timesteps: list[int], steps: int) -> list[int]:
    """The student timesteps an n-step sample visits: every (N // n)-th from τ1, as diffusers'
    ``LCMScheduler`` picks them, so the exported pipeline samples exactly like this function."""
    n = len(student_timesteps)
    if not 1 <= steps <= n:
        raise ValueError(f"the student samples in 1..{n} steps (its timesteps are {student_timesteps}), got {steps}")
    return list(student_timesteps[:: n // steps][:steps])


def student_noise(shape: tuple[int, ...], steps: int, generator: torch.Generator | None = None) -> list[Tensor]:
    """The noise an n-step student sample draws, in its order: x_τ1, then one re-noising per later step
    (CPU float32). Drawn ahead, so samples computed together (a server's batch) keep each one's own draws."""
    return [_noise(shape, generator, "cpu", torch.float32) for _ in range(steps)]


@torch.no_grad()
def sample_student(
    student: Student,
    cond: Conditioning | None,
    shape: tuple[int, ...],
    steps: int = 1,
    generator: torch.Generator | None = None,
    *,
    noise: list[Tensor] | None = None,
) -> Tensor:
    """Start from pure noise at τ1; predict x0, re-noise it with fresh noise to the next student
    timestep, repeat; return the last x0. One network call per step, no guidance. ``noise``
    (``student_noise``'s list) replaces the draws from ``generator``."""
    device, dtype = _placement(student)
    timesteps = sampling_timesteps(student.timesteps.tolist(), steps)
    noise = noise if noise is not None else student_noise(shape, steps, generator)
    if len(noise) != steps or any(tuple(n.shape) != tuple(shape) for n in noise):
        raise ValueError(f"noise: {steps} tensors of shape {tuple(shape)} expected")
    x = noise[0].to(device, dtype)
    cond = cond if cond is not None else Conditioning()
    for i, s in enumerate(timesteps):
        t = torch.full((shape[0],), s, device=device, dtype=torch.long)
        x0 = student.denoise(x, t, cond)
        if i + 1 < len(timesteps):
            t_next = torch.full_like(t, timesteps[i + 1])
            x = student.schedule.add_noise(x0, noise[i + 1].to(device, dtype), t_next)
    return x0


def teacher_scheduler(teacher: Teacher, solver: str, timestep_spacing: str = "trailing"):
    """A diffusers scheduler over the teacher's own schedule, fed x0-estimates (``sample``)."""
    config = {**teacher.scheduler_config, "prediction_type": "sample", "timestep_spacing": timestep_spacing}
    if solver == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True)
    if solver == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown teacher solver {solver!r}: allowed are {', '.join(TEACHER_SOLVERS)}")


@torch.no_grad()
def sample_teacher(
    teacher: Teacher,
    cond: Conditioning | None,
    shape: tuple[int, ...],
    steps: int = 50,
    generator: torch.Generator | None = None,
    *,
    solver: str = "ddim",
    guidance_scale: float = 1.0,
    timestep_spacing: str = "trailing",
    progress: bool = False,
) -> Tensor:
    """The teacher's reference sample: DDIM or DPM-Solver++ with classifier-free guidance
    (2 network evaluations per step when guided)."""
    scheduler = teacher_scheduler(teacher, solver, timestep_spacing)
    scheduler.set_timesteps(steps)
    device, dtype = _placement(teacher)
    x = _noise(shape, generator, device, dtype) * scheduler.init_noise_sigma
    cond = cond if cond is not None else Conditioning()
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=f"teacher {solver} {steps} steps"):
        t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        x0 = teacher.denoise(scheduler.scale_model_input(x, t), t_batch, cond, guidance_scale)
        x = scheduler.step(x0, t, x, generator=generator).prev_sample
    return x
