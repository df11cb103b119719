"""Tiny SD and SDXL teachers: load, distil a few steps, export, reload, sample in one step."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, LCMScheduler

from tests.tiny_models import PIXEL_SIZE, save_tiny_pixel_unet, save_tiny_sd, save_tiny_sdxl, tiny_dinov2
from workers.add.components import load_teacher
from workers.add.discriminator import build_discriminator
from workers.add.export import export_student, load_student
from workers.add.sampler import sample_student, sample_teacher, sampling_timesteps
from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
from workers.add.student import Student

PROMPTS = ["a photo of a sneaker", "a black dress"]


def distil(teacher, steps=2, lora_rank=None, prompts=PROMPTS):
    """A few real ADD iterations (Adam, nonzero lr) so the student differs from the teacher."""
    student = Student(teacher, lora_rank=lora_rank)
    D = build_discriminator(
        "dinov2", cond_dim=teacher.prompt_encoder.pooled_dim, dinov2=tiny_dinov2(), resolution=32
    )
    models = ADDModels(student, teacher, D)
    opt_g = torch.optim.Adam(student.trainable_parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    cond = teacher.encode_prompts(prompts)
    for i in range(steps):
        batch = ADDBatch.from_pixels(
            teacher, torch.rand(len(prompts), 3, PIXEL_SIZE, PIXEL_SIZE) * 2 - 1, cond
        )
        _, fake = student_step(models, ADDObjective(), batch, opt_g, g)
        discriminator_step(models, ADDObjective(), batch, fake, opt_d, i, g)
    return student


def one_step(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, generator=g, output_type="np").images


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("lora_rank", [None, 4], ids=["full", "lora"])
def test_distil_export_reload_sample_one_step(tmp_path, kind, lora_rank):
    source = (save_tiny_sd if kind == "sd" else save_tiny_sdxl)(tmp_path / "teacher")
    teacher = load_teacher(str(source))
    student = distil(teacher, lora_rank=lora_rank)
    out = export_student(student, teacher, tmp_path / "student")

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    first, second = one_step(pipe), one_step(pipe)
    assert first.shape == (2, PIXEL_SIZE, PIXEL_SIZE, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)  # a fixed seed gives identical images

    # the pipeline samples exactly like our sampler: same noise, same x0, same decode
    reloaded, parts = load_student(out)
    latent_shape = (2, parts.codec.latent_channels, 8, 8)
    x0 = sample_student(
        reloaded, parts.encode_prompts(PROMPTS), latent_shape, 1, torch.Generator().manual_seed(0)
    )
    ours = (parts.codec.decode(x0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(ours, first, atol=2e-3)

    # and the reloaded student is the trained one (LoRA merged), not the teacher; raw outputs are
    # compared: at t = 999 an ε-model's x0 divides by α ≈ 2^-12 and magnifies rounding
    x_t, t = torch.randn(latent_shape), torch.tensor([999, 500])
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        trained = student.denoiser.model_output(x_t, t, cond)
        torch.testing.assert_close(
            reloaded.denoiser.model_output(x_t, t, cond), trained, atol=1e-5, rtol=1e-4
        )
        assert not torch.allclose(trained, teacher.denoiser.model_output(x_t, t, cond), atol=1e-4)


def test_multi_step_pipeline_uses_the_student_timesteps(tmp_path):
    teacher = load_teacher(str(save_tiny_sd(tmp_path / "teacher", prediction_type="v_prediction")))
    out = export_student(Student(teacher), teacher, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    for n in (1, 2, 4):
        pipe.scheduler.set_timesteps(n)
        assert pipe.scheduler.timesteps.tolist() == sampling_timesteps([999, 749, 499, 249], n)


def test_unconditional_pixel_student_exports_as_ddpm_pipeline(tmp_path):
    teacher = load_teacher(str(save_tiny_pixel_unet(tmp_path / "teacher")))
    out = export_student(Student(teacher), teacher, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    images = [
        pipe(
            batch_size=1, num_inference_steps=1, generator=torch.Generator().manual_seed(1), output_type="np"
        ).images
        for _ in range(2)
    ]
    np.testing.assert_array_equal(*images)


@pytest.mark.parametrize("conditioning", ["class", "sentence"])
def test_conditioned_pixel_student_round_trips(tmp_path, conditioning):
    teacher = load_teacher(str(save_tiny_pixel_unet(tmp_path / "teacher", conditioning=conditioning)))
    student = Student(teacher)
    out = export_student(student, teacher, tmp_path / "student")
    reloaded, parts = load_student(out)
    cond = parts.encode_prompts([3, 4] if conditioning == "class" else PROMPTS)
    shape = (2, 3, PIXEL_SIZE, PIXEL_SIZE)
    a = sample_student(reloaded, cond, shape, 1, torch.Generator().manual_seed(0))
    b = sample_student(student, cond, shape, 1, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path):
    teacher = load_teacher(str(save_tiny_pixel_unet(tmp_path / "teacher")))
    student = Student(teacher)
    out = export_student(student, teacher, tmp_path / "student")
    with pytest.raises(FileExistsError, match="already exists"):
        export_student(student, teacher, out)
    bad = Student(teacher, timesteps=[999, 899, 799, 699])
    with pytest.raises(ValueError, match="not trailing-spaced"):
        export_student(bad, teacher, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student", "teacher"]  # no half-written folder


def test_teacher_reference_samplers_run_with_guidance(tmp_path):
    teacher = load_teacher(str(save_tiny_sd(tmp_path / "teacher")))
    cond = teacher.encode_prompts(PROMPTS)
    for solver in ("ddim", "dpmpp"):
        x = sample_teacher(
            teacher,
            cond,
            (2, 4, 8, 8),
            steps=3,
            solver=solver,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="unknown teacher solver 'euler'"):
        sample_teacher(teacher, cond, (2, 4, 8, 8), steps=2, solver="euler")
    with pytest.raises(ValueError, match="samples in 1..4 steps"):
        sample_student(Student(teacher), cond, (2, 4, 8, 8), steps=5)


def test_teacher_and_student_samplers_share_one_contract(tmp_path):
    """sample_*(model, cond, shape, steps, generator, *, options): the same positional prefix, the rest
    by keyword only, and the same generator gives the same sample when passed either way."""
    import inspect

    prefixes = []
    for sampler in (sample_student, sample_teacher):
        params = list(inspect.signature(sampler).parameters.values())
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[len(positional) :]), sampler.__name__
        prefixes.append(positional[1:])
    assert prefixes[0] == prefixes[1] == ["cond", "shape", "steps", "generator"]
    teacher = load_teacher(str(save_tiny_sd(tmp_path / "teacher")))
    cond, shape = teacher.encode_prompts(PROMPTS), (2, 4, 8, 8)
    for sampler, model in ((sample_teacher, teacher), (sample_student, Student(teacher))):
        a = sampler(model, cond, shape, 2, torch.Generator().manual_seed(3))
        b = sampler(model, cond=cond, shape=shape, steps=2, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
