"""Flow-matching transformer students (SD3, FLUX, Sana): distil, export as the family's own pipeline folder,
reload with ``DiffusionPipeline.from_pretrained``, and sample exactly as ``sample_student`` does at 1..N steps;
LoRA merged; FLUX's guidance and packing round-trip; the pyfunc, ``generate`` and the registry on an SD3 student."""

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)
from PIL import Image

from tests.tiny_models import LATENT_SIZE, PIXEL_SIZE, TEXT_LENGTH, save_tiny_flux, save_tiny_sana, save_tiny_sd3
from workers.add.components import load_teacher
from workers.add.discriminator import build_discriminator
from workers.add.export import STUDENT_FILE, export_student, load_student, pipeline_sigmas
from workers.add.sampler import sample_student, sampling_timesteps
from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
from workers.add.student import Student

PROMPTS = ["a photo of a sneaker", "a black bag"]
B, C = 2, 4
SANA_PIXELS = 32  # SanaPipeline takes sizes divisible by 32 only: 16×16 latents there
SAVERS = {
    "sd3": save_tiny_sd3,
    "flux": save_tiny_flux,
    "flux_dev": lambda p: save_tiny_flux(p, guidance_embeds=True),
    "sana": save_tiny_sana,
}
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline, "flux_dev": FluxPipeline, "sana": SanaPipeline}
GUIDANCE = 2.0  # the guidance-distilled FLUX is trained at a guidance other than the pipeline's default 3.5


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-teachers")
    return {name: save(root / name) for name, save in SAVERS.items()}


def teacher_of(folders, name):
    return load_teacher(folders[name], guidance=GUIDANCE if name == "flux_dev" else None)


def distil(teacher, lora_rank=None, steps=2):
    """A few real ADD iterations (LADD heads on the teacher's tokens, Adam) so the student leaves the teacher."""
    student = Student(teacher, lora_rank=lora_rank)
    D = build_discriminator("teacher", cond_dim=teacher.prompt_encoder.pooled_dim, teacher=teacher)
    models = ADDModels(student, teacher, D)
    opt_g = torch.optim.Adam(student.trainable_parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(D.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    cond = teacher.encode_prompts(PROMPTS)
    for i in range(steps):
        pixels = torch.rand(B, 3, PIXEL_SIZE, PIXEL_SIZE, generator=g) * 2 - 1
        batch = ADDBatch.from_pixels(teacher, pixels, cond)
        _, fake = student_step(models, ADDObjective(), batch, opt_g, g)
        discriminator_step(models, ADDObjective(), batch, fake, opt_d, i, g)
    return student


def pixels(name):
    return SANA_PIXELS if name == "sana" else PIXEL_SIZE


def shape(name):
    """x_t's shape for ``name``'s sample: latents at half the pixel size."""
    return (B, C, pixels(name) // 2, pixels(name) // 2)


def run_pipeline(pipe, name, steps, seed, step_seed, sigmas):
    """``pipe(prompt, num_inference_steps=steps)`` without guidance, at the tiny size and text length."""
    size = pixels(name)
    kwargs = {"height": size, "width": size, "max_sequence_length": TEXT_LENGTH, "output_type": "np"}
    if name == "sana":
        kwargs["use_resolution_binning"] = False  # Sana's bins know real sizes only
    guidance = GUIDANCE if name == "flux_dev" else 1.0  # > 1 would be CFG for SD3 / Sana; FLUX.1-dev embeds it
    if sigmas is not None:
        kwargs["sigmas"] = sigmas
    torch.manual_seed(step_seed)  # SD3 and FLUX draw the re-noising from the global generator (see pipeline_noise)
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=g, **kwargs).images


def pipeline_noise(name, steps, seed, step_seed):
    """The noise the pipeline draws, in ``sample_student``'s order: x at σ = 1 from the call's generator (unpacked
    latents for FLUX too), then one re-noising per later step. Sana passes its generator to the scheduler's step,
    so it is that generator's next draws; ``StableDiffusion3Pipeline`` and ``FluxPipeline`` call ``step`` without
    it, so those are the global generator's (FLUX's in the packed token layout, unpacked here)."""
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(shape(name), generator=g)]
    step_g = g if name == "sana" else torch.Generator().manual_seed(step_seed)
    for _ in range(steps - 1):
        if name.startswith("flux"):
            packed = torch.randn(B, (LATENT_SIZE // 2) ** 2, C * 4, generator=step_g)
            noise.append(FluxPipeline._unpack_latents(packed, PIXEL_SIZE, PIXEL_SIZE, 2))
        else:
            noise.append(torch.randn(shape(name), generator=step_g))
    return noise


def ours(student, parts, noise):
    """``sample_student`` with that noise, decoded as the pipelines decode: images in [0, 1], (B, H, W, 3)."""
    x0 = sample_student(student, parts.encode_prompts(PROMPTS), tuple(noise[0].shape), len(noise), noise=noise)
    with torch.no_grad():
        return (parts.codec.decode(x0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


CASES = [("sd3", None), ("sd3", 4), ("flux", None), ("flux_dev", 4), ("sana", None)]


@pytest.mark.parametrize(("name", "lora_rank"), CASES, ids=[f"{n}-{'lora' if r else 'full'}" for n, r in CASES])
def test_exported_pipeline_samples_exactly_as_the_student_sampler(folders, tmp_path, name, lora_rank):
    teacher = teacher_of(folders, name)
    student = distil(teacher, lora_rank=lora_rank)
    out = export_student(student, teacher, tmp_path / "student")

    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert type(pipe) is PIPELINES[name]
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.stochastic_sampling
    assert not any("lora" in k for k in pipe.transformer.state_dict())  # LoRA merged into the weights
    info = json.loads((out / STUDENT_FILE).read_text())
    assert info.get("guidance") == (GUIDANCE if name == "flux_dev" else None)

    reloaded, parts = load_student(out)
    assert reloaded.schedule.shift == pytest.approx(student.schedule.shift, rel=1e-12)  # FLUX: e^μ frozen in
    if name == "flux_dev":
        assert parts.prompt_encoder.guidance == GUIDANCE
    # the reloaded student is the trained one (LoRA merged), not the teacher
    x_t, t = torch.randn(shape(name), generator=torch.Generator().manual_seed(5)), torch.tensor([999, 400])
    cond = teacher.encode_prompts(PROMPTS)
    with torch.no_grad():
        trained = student.denoise(x_t, t, cond)
        torch.testing.assert_close(reloaded.denoise(x_t, t, cond), trained, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(trained, teacher.denoise(x_t, t, cond), atol=1e-4)

    # every step count: the pipeline visits the student's σ and draws the same noise, so the images agree
    for steps in range(1, len(student.timesteps) + 1):
        seed, step_seed = 10 + steps, 100 + steps
        image = run_pipeline(pipe, name, steps, seed, step_seed, pipeline_sigmas(out, steps))
        assert image.shape == (B, pixels(name), pixels(name), 3)
        expected = ours(reloaded, parts, pipeline_noise(name, steps, seed, step_seed))
        np.testing.assert_allclose(image, expected, atol=1e-4, err_msg=f"{steps} steps")
        # the σ it visited are the student's own, in float32
        taken = sampling_timesteps(student.timesteps.tolist(), steps)
        torch.testing.assert_close(
            pipe.scheduler.sigmas[:-1], student.schedule.sigma_at(torch.tensor(taken)).float(), rtol=0, atol=1e-6
        )
    if name == "sana":  # the pipeline's generator also drives the re-noising: plain sample_student reproduces it
        image = run_pipeline(pipe, name, 4, 3, 0, pipeline_sigmas(out, 4))
        x0 = sample_student(reloaded, parts.encode_prompts(PROMPTS), shape(name), 4, torch.Generator().manual_seed(3))
        with torch.no_grad():
            expected = (parts.codec.decode(x0) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(image, expected, atol=1e-4)


@pytest.mark.parametrize("name", ["sd3", "flux", "sana"])
def test_num_inference_steps_alone_meets_the_student_where_the_pipelines_spacing_does(folders, tmp_path, name):
    """Without ``sigmas`` a pipeline spaces σ its own way: one step is σ = 1 for all; FluxPipeline's linspace(1, 1/n, n)
    is the trailing student grid for every n dividing N; SD3's and Sana's linspace ends at σ_min whatever n."""
    teacher = teacher_of(folders, name)
    out = export_student(Student(teacher), teacher, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded, parts = load_student(out)
    exact = {1, 2, 4} if name == "flux" else {1}
    for steps in (1, 2, 3, 4):
        image = run_pipeline(pipe, name, steps, 7, 8, sigmas=None)
        taken = sampling_timesteps(reloaded.timesteps.tolist(), steps)
        sigmas = reloaded.schedule.sigma_at(torch.tensor(taken)).float()
        visited = pipe.scheduler.sigmas[:-1]
        if steps in exact:
            torch.testing.assert_close(visited, sigmas, rtol=0, atol=1e-6)
            expected = ours(reloaded, parts, pipeline_noise(name, steps, 7, 8))
            np.testing.assert_allclose(image, expected, atol=1e-4)
        else:
            assert not torch.allclose(visited, sigmas, atol=1e-3)


def test_flux_guidance_and_packing_round_trip(folders, tmp_path):
    """A guidance-distilled FLUX student: the guidance it was trained with is what the reloaded student and the
    pipeline embed; another guidance gives another image. Packing: the pipeline's packed latents are ours."""
    teacher = teacher_of(folders, "flux_dev")
    out = export_student(Student(teacher), teacher, tmp_path / "student")
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    reloaded, parts = load_student(out)
    assert json.loads((out / STUDENT_FILE).read_text())["guidance"] == GUIDANCE
    cond = parts.encode_prompts(PROMPTS)
    assert cond.guidance.tolist() == [GUIDANCE] * B
    x = torch.randn(shape("flux"), generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(x, B, C, LATENT_SIZE, LATENT_SIZE)
    latents = pipe(
        PROMPTS, num_inference_steps=1, guidance_scale=GUIDANCE, latents=packed, height=PIXEL_SIZE, width=PIXEL_SIZE,
        max_sequence_length=TEXT_LENGTH, output_type="latent",
    ).images  # fmt: skip
    unpacked = FluxPipeline._unpack_latents(latents, PIXEL_SIZE, PIXEL_SIZE, 2)
    with torch.no_grad():
        x0 = reloaded.denoise(x, torch.full((B,), 999), cond)
    torch.testing.assert_close(unpacked, x0, atol=1e-5, rtol=1e-4)
    other = pipe(
        PROMPTS, num_inference_steps=1, guidance_scale=3.5, latents=packed, height=PIXEL_SIZE, width=PIXEL_SIZE,
        max_sequence_length=TEXT_LENGTH, output_type="latent",
    ).images  # fmt: skip
    assert not torch.allclose(other, latents, atol=1e-4)


def test_a_flow_student_predicting_x0_is_refused(folders, tmp_path):
    teacher = teacher_of(folders, "sd3")
    with pytest.raises(ValueError, match="read the transformer's output as the velocity"):
        export_student(Student(teacher, prediction_type="sample"), teacher, tmp_path / "student")
    assert not (tmp_path / "student").exists()
    with pytest.raises(ValueError, match="samples in 1..4 steps, got 5"):
        pipeline_sigmas(export_student(Student(teacher), teacher, tmp_path / "ok"), 5)


def test_export_copy_builds_transformer_students_through_the_family(folders, tmp_path):
    """The training loop's export: an unsharded student of the family's class holding a consolidated state dict,
    written by ``write_export`` as the family's pipeline folder."""
    import pyarrow.fs as pafs

    from workers.train.config import TrainJob
    from workers.train.export import export_step, write_export
    from workers.train.models import export_copy

    teacher = teacher_of(folders, "flux")
    for lora_rank in (None, 4):
        spec = TrainJob.model_validate({"name": "t", "teacher": {"source": str(folders["flux"])},
                                        "data": {"uri": "unused"}, "student": {"lora_rank": lora_rank}})  # fmt: skip
        trained = distil(teacher, lora_rank=lora_rank, steps=1)
        copy = export_copy(spec, teacher, trained.state_dict())
        assert type(copy.unet) is type(teacher.unet) and copy.lora_rank == lora_rank
        x_t, t, cond = torch.randn(shape("flux")), torch.tensor([999, 300]), teacher.encode_prompts(PROMPTS)
        with torch.no_grad():
            torch.testing.assert_close(copy.denoise(x_t, t, cond), trained.denoise(x_t, t, cond))
        fs, path = pafs.LocalFileSystem(), str(tmp_path / f"export-{lora_rank}")
        write_export(copy, teacher, fs, path, {"step": 1})
        assert export_step(fs, path) == 1
        assert type(DiffusionPipeline.from_pretrained(path, local_files_only=True)) is FluxPipeline


def test_sd3_student_through_the_registry_pyfunc_and_generate(folders, tmp_path):
    """The pyfunc, the registry and ``generate`` work unchanged on an exported SD3 student, and give the
    pipeline's own one-step images."""
    from mlflow.tracking import MlflowClient

    from orchestrator.generate import generate
    from orchestrator.pyfunc import fluent_context, log_student_model
    from orchestrator.registry import register_candidate

    teacher = teacher_of(folders, "sd3")
    out = export_student(distil(teacher, steps=1), teacher, tmp_path / "student")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with fluent_context(uri, None):
        experiment = client.create_experiment("flow", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(experiment)
        info = log_student_model(run.info.run_id, str(out), PROMPTS, tracking_uri=uri)
        client.set_terminated(run.info.run_id)
        version = register_candidate(client, "sd3-student", info.model_uri, run.info.run_id, model_id=info.model_id)
        import mlflow

        model = mlflow.pyfunc.load_model(f"models:/sd3-student/{version.version}")
    frame = model.predict(pd.DataFrame({"prompt": PROMPTS}), params={"num_inference_steps": 1, "seed": 3})
    pngs = [np.asarray(Image.open(io.BytesIO(png))) for png in frame["image"]]
    assert [p.shape for p in pngs] == [(PIXEL_SIZE, PIXEL_SIZE, 3)] * B

    # the pyfunc's images are the pipeline's, to 8-bit rounding
    pipe = DiffusionPipeline.from_pretrained(out, local_files_only=True)
    image = run_pipeline(pipe, "sd3", 1, 3, 0, sigmas=None)
    np.testing.assert_allclose(np.stack(pngs) / 255.0, image, atol=1 / 255 + 1e-6)

    grid = generate(f"models:/sd3-student/{version.version}", PROMPTS, tmp_path / "grid.png", seed=3, tracking_uri=uri)
    assert Image.open(grid).size[0] >= B * PIXEL_SIZE


def test_a_flux_student_reloads_at_the_resolution_it_was_trained_at(folders, tmp_path):
    """FLUX's shift and sample size follow the resolution: a student trained at twice the VAE's default
    size reloads at that size (its token count, its shift), not at the loader's default."""
    default = teacher_of(folders, "flux")
    resolution = 2 * PIXEL_SIZE
    teacher = load_teacher(folders["flux"], resolution=resolution)
    assert teacher.image_seq_len != default.image_seq_len
    out = export_student(Student(teacher), teacher, tmp_path / "student")
    assert json.loads((out / STUDENT_FILE).read_text())["resolution"] == resolution
    reloaded, parts = load_student(out)
    assert parts.image_seq_len == teacher.image_seq_len
    assert reloaded.schedule.shift == pytest.approx(Student(teacher).schedule.shift)
