"""Samplers: the student's few-step ancestral sampler and the teacher's reference samplers.

One contract (as k-diffusion's samplers share one signature): ``sample_*(model, cond, shape, steps,
generator, *, options)``, positional up to the generator, each sampler's own settings by keyword only.
All return x0 in the model's space (latents for latent models); decode with ``teacher.codec``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor
from tqdm.auto import tqdm

from workers.add.conditioning import Conditioning
from workers.add.student import Student
from workers.add.teacher import Teacher

DDPM_SOLVERS = ("ddim", "dpmpp")
FLOW_SOLVERS = ("euler", "flow-dpmpp")  # the pipelines' own: SD3 / FLUX (Euler), Sana (DPM-Solver++)
TEACHER_SOLVERS = DDPM_SOLVERS + FLOW_SOLVERS


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


def teacher_solvers(teacher: Teacher) -> tuple[str, ...]:
    """The solvers that apply to this teacher's schedule; the first is its default."""
    return FLOW_SOLVERS if teacher.schedule.is_flow else DDPM_SOLVERS


def check_solver(teacher: Teacher, solver: str) -> str:
    """``solver``, or a ValueError naming the solvers this teacher allows."""
    allowed = teacher_solvers(teacher)
    if solver not in allowed:
        kind = "flow-matching" if teacher.schedule.is_flow else "DDPM"
        raise ValueError(f"unknown teacher solver {solver!r} for a {kind} teacher: allowed are {', '.join(allowed)}")
    return solver


def teacher_scheduler(teacher: Teacher, solver: str, timestep_spacing: str = "trailing"):
    """A diffusers scheduler over a DDPM teacher's own schedule, fed x0-estimates (``sample``)."""
    check_solver(teacher, solver)
    config = {**teacher.scheduler_config, "prediction_type": "sample", "timestep_spacing": timestep_spacing}
    if solver == "ddim":
        return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True)
    return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)


def flow_scheduler(teacher: Teacher, solver: str, steps: int):
    """The scheduler a flow teacher's family pipeline samples with, its inference sigmas set for ``steps``.

    ``euler``: ``FlowMatchEulerDiscreteScheduler`` at the teacher's shift, its own sigmas (SD3); with a
    resolution-dependent shift the sigmas ``FluxPipeline`` passes, linspace(1, 1/n, n), shifted by e^μ.
    ``flow-dpmpp``: ``DPMSolverMultistepScheduler`` on flow sigmas (Sana's), fed x0 (``sample``): the
    ``flow_prediction`` it would convert from is x_t − σ·v, the same x0.
    """
    check_solver(teacher, solver)
    schedule = teacher.schedule
    config = {k: v for k, v in teacher.scheduler_config.items() if not k.startswith("_")}
    if solver == "euler":
        dynamic = bool(config.get("use_dynamic_shifting"))
        if not dynamic:
            config["shift"] = schedule.shift  # Sana's config names it flow_shift
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if dynamic:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=math.log(schedule.shift))
        else:
            scheduler.set_timesteps(steps)
        return scheduler
    if teacher.scheduler_config.get("_class_name") != "DPMSolverMultistepScheduler":
        config = {"num_train_timesteps": schedule.num_train_timesteps}  # a DDPM solver's config says nothing here
    scheduler = DPMSolverMultistepScheduler.from_config(
        config,
        algorithm_type="dpmsolver++",
        solver_order=2,
        use_flow_sigmas=True,
        flow_shift=schedule.shift,
        prediction_type="sample",
        use_dynamic_shifting=False,  # the shift is the schedule's, e^μ already for FLUX
    )
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_teacher(
    teacher: Teacher,
    cond: Conditioning | None,
    shape: tuple[int, ...],
    steps: int = 50,
    generator: torch.Generator | None = None,
    *,
    solver: str | None = None,
    guidance_scale: float = 1.0,
    timestep_spacing: str = "trailing",
    progress: bool = False,
) -> Tensor:
    """The teacher's reference sample with classifier-free guidance (2 network evaluations per step when
    guided): DDIM or DPM-Solver++ for a DDPM teacher, Euler or flow DPM-Solver++ for a flow teacher
    (``solver`` None: DDIM / Euler; ``timestep_spacing`` applies to the DDPM solvers only)."""
    solver = check_solver(teacher, solver or teacher_solvers(teacher)[0])
    if teacher.schedule.is_flow:
        return _sample_flow_teacher(teacher, cond, shape, steps, generator, solver, guidance_scale, progress)
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


def _sample_flow_teacher(teacher, cond, shape, steps, generator, solver, guidance_scale, progress) -> Tensor:
    """Flow solvers from x = ε at σ = 1, the teacher called at each inference σ the pipeline visits.

    Those σ fall between the integer grid, so the teacher is called at their fractional index
    (``FlowMatchSchedule.index_of``); its network takes σ·T unrounded (Sana's pipeline truncates it
    to an integer, a difference under 1/T in σ).
    """
    schedule = teacher.schedule
    scheduler = flow_scheduler(teacher, solver, steps)
    device, dtype = _placement(teacher)
    x = _noise(shape, generator, device, dtype)  # σ = 1: x_T = ε (init_noise_sigma is 1)
    cond = cond if cond is not None else Conditioning()
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc=f"teacher {solver} {steps} steps")):
        t_index = schedule.index_of(scheduler.sigmas[i].double()).expand(shape[0]).to(device)
        x0 = teacher.denoise(x, t_index, cond, guidance_scale)
        # Euler steps along v = (x_t − x0)/σ_t, the velocity of the guided x0; DPM-Solver++ takes x0
        model_output = schedule.velocity_from_x0(x0, x, t_index) if solver == "euler" else x0
        x = scheduler.step(model_output, t, x).prev_sample
    return x
