"""Time one ADD iteration against one plain diffusion fine-tuning step of the same student.

Example:
    addctl bench step --teacher path/to/diffusers/folder --batch-size 8 --iters 20

Splits the ADD iteration into student, teacher and discriminator time with the step's own
``record_function`` labels (torch.profiler), warmed up, median of the timed iterations.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from workers.add.components import load_teacher
from workers.add.discriminator import build_discriminator
from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
from workers.add.student import Student

SECTIONS = ("add/student", "add/teacher", "add/discriminator")


def plain_diffusion_step(student: Student, batch: ADDBatch, optimizer, generator) -> None:
    """The baseline: ε/v/x0 regression of the same student at a random timestep."""
    x0 = batch.x0
    t = torch.randint(student.schedule.num_train_timesteps, (x0.shape[0],), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    x_t = student.schedule.add_noise(x0, eps, t)
    target = student.schedule.from_x0(x0, x_t, t)
    loss = (student.denoiser.model_output(x_t, t, batch.cond) - target).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def run(teacher_path: str, backbone: str, batch_size: int, iters: int, warmup: int, image_size: int) -> dict:
    """Median seconds per ADD iteration, its split, and the plain fine-tuning step's time."""
    g = torch.Generator().manual_seed(0)
    teacher = load_teacher(teacher_path)
    student = Student(teacher)
    cond_dim = teacher.prompt_encoder.pooled_dim if teacher.prompt_encoder is not None else 0
    D = build_discriminator(backbone, cond_dim=cond_dim, teacher=teacher)
    models, objective = ADDModels(student, teacher, D), ADDObjective()
    opt_g = torch.optim.AdamW(student.trainable_parameters(), lr=1e-5)
    opt_d = torch.optim.AdamW(D.trainable_parameters(), lr=1e-5)
    channels = 3
    pixels = torch.rand(batch_size, channels, image_size, image_size, generator=g) * 2 - 1
    prompts = ["a photo of a sneaker"] * batch_size
    cond = teacher.encode_prompts(prompts) if teacher.prompt_encoder is not None else None
    batch = ADDBatch.from_pixels(teacher, pixels, cond)

    def add_iteration(i):
        _, fake = student_step(models, objective, batch, opt_g, g)
        discriminator_step(models, objective, batch, fake, opt_d, i, g)

    add_times, plain_times, splits = [], [], {s: [] for s in SECTIONS}
    for i in range(warmup):
        add_iteration(i)
        plain_diffusion_step(student, batch, opt_g, g)
    for i in range(iters):  # wall time without the profiler
        start = time.perf_counter()
        plain_diffusion_step(student, batch, opt_g, g)
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        add_iteration(i)
        add_times.append(time.perf_counter() - start)
    for i in range(iters):  # the split, from the step's record_function labels
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            add_iteration(i)
        totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key in SECTIONS}
        for s in SECTIONS:
            splits[s].append(totals.get(s, 0.0))
    add, plain = statistics.median(add_times), statistics.median(plain_times)
    return {
        "teacher": teacher_path,
        "backbone": backbone,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "add_iteration_s": add,
        "split_s": {s.split("/")[1]: statistics.median(v) for s, v in splits.items()},
        "plain_finetune_step_s": plain,
        "overhead_x": add / plain,
    }
