"""Flow-matching teachers: the rectified-flow schedule against diffusers, the teacher's Euler and flow
DPM-Solver++ samplers against the family pipelines' own loops, the student sampler on the flow path,
one ADD step under every weighting, and the toy proof (ADD beats the teacher's one-step Euler sample)."""

import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from workers.add.conditioning import Conditioning
from workers.add.losses import WEIGHTINGS, DistillationLoss, R1Penalty
from workers.add.sampler import FLOW_SOLVERS, TEACHER_SOLVERS, sample_student, sample_teacher, student_noise
from workers.add.schedule import FlowMatchSchedule, NoiseSchedule, schedule_from_scheduler_config
from workers.add.step import (
    ADDBatch,
    ADDModels,
    ADDObjective,
    Update,
    discriminator_step,
    distillation_timesteps,
    student_backward,
)
from workers.add.student import Student
from workers.add.teacher import Teacher
from workers.add.toy import (
    TOY_FLOW_SCHEDULER,
    TOY_SCHEDULER,
    ExactDenoiser,
    GaussianMixture,
    MLPDenoiser,
    ToyDiscriminator,
    run_toy,
)

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
SANA = {  # Sana ships DPM-Solver++ on flow sigmas
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "prediction_type": "flow_prediction",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}


# --- the schedule -----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_grid_is_the_flow_match_euler_training_grid(shift):
    schedule = FlowMatchSchedule(1000, shift)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # diffusers keeps them descending (t = T−1 first) in float32
    torch.testing.assert_close(schedule.sigmas.flip(0).float(), reference.sigmas, rtol=0, atol=1e-6)
    assert schedule.sigmas[-1] == 1.0  # t = T − 1 is pure noise by construction
    torch.testing.assert_close(schedule.alphas, 1 - schedule.sigmas)
    torch.testing.assert_close(schedule.model_timestep(torch.arange(1000)), reference.timesteps.flip(0))


def test_static_shift_maps_uniform_sigma_as_sd3_does():
    schedule = schedule_from_scheduler_config(SD3)
    assert isinstance(schedule, FlowMatchSchedule) and schedule.shift == 3.0
    t = torch.tensor([0, 249, 499, 999])
    u = (t.double() + 1) / 1000
    expected = 3 * u / (1 + 2 * u)  # s·u / (1 + (s − 1)·u)
    torch.testing.assert_close(schedule.sigma(t, torch.empty(4, 1, dtype=torch.float64)).flatten(), expected)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_flux_dynamic_shift_equals_flux_pipeline_and_scheduler_time_shift(image_seq_len):
    schedule = schedule_from_scheduler_config(FLUX, image_seq_len=image_seq_len)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(schedule.sigmas, scheduler.time_shift(mu, 1.0, u))
    with pytest.raises(ValueError, match="image_seq_len"):
        schedule_from_scheduler_config(FLUX)


def test_sana_dpm_config_is_a_flow_schedule_with_its_flow_shift():
    schedule = schedule_from_scheduler_config(SANA)
    assert schedule.is_flow and schedule.shift == 3.0 and schedule.prediction_type == "flow"


@pytest.mark.parametrize("prediction_type", ["flow", "sample"])
def test_flow_conversions_round_trip(prediction_type):
    s = FlowMatchSchedule(1000, 3.0, prediction_type)
    x0, eps = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s.sigma(t, x0)) * x0 + s.sigma(t, x0) * eps)
    out = s.from_x0(x0, x_t, t)
    torch.testing.assert_close(out, {"flow": eps - x0, "sample": x0}[prediction_type])
    torch.testing.assert_close(s.to_x0(out, x_t, t), x0)
    torch.testing.assert_close(s.velocity_from_x0(x0, x_t, t), eps - x0)
    torch.testing.assert_close(s.eps_from_x0(x0, x_t, t), eps)  # ε from x0 holds on the flow path too
    torch.testing.assert_close(x_t[-1], eps[-1])  # σ = 1: pure noise


def test_fractional_index_addresses_sigmas_between_grid_points():
    s = FlowMatchSchedule(1000, 3.0)
    like = torch.empty(1, dtype=torch.float64)
    # a whole float index is the grid point itself (bit for bit), and index_of inverts σ
    t = torch.arange(1000)
    assert torch.equal(s.sigma_at(t.double()), s.sigmas)
    torch.testing.assert_close(s.index_of(s.sigmas), t.double())
    sigma = torch.tensor([1.0, 0.9, 0.31, 0.002], dtype=torch.float64)
    index = s.index_of(sigma)
    assert index[0] == 999 and not torch.equal(index, index.round())
    torch.testing.assert_close(s.sigma(index, like.expand(4, 1)).flatten(), sigma)
    torch.testing.assert_close(s.model_timestep(index), (sigma * 1000).float())


# --- teacher samplers -------------------------------------------------------------------------


def velocity_field(mixture: GaussianMixture, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The mixture's exact velocity at noise level σ, as a pipeline's transformer would give it."""
    schedule = FlowMatchSchedule(1000, 1.0)  # any: the denoiser reads α, σ only through the index
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
    return ExactDenoiser(mixture, schedule)(x, schedule.index_of(sigma), Conditioning())


class RecordingNetwork(torch.nn.Module):
    """Wraps a toy network and records each call's (x_t, t)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone()))
        return self.net(x_t, t, cond)


def flow_teacher(config: dict, image_seq_len: int | None = None) -> tuple[Teacher, RecordingNetwork]:
    schedule = schedule_from_scheduler_config(config, image_seq_len=image_seq_len)
    network = RecordingNetwork(ExactDenoiser(GaussianMixture(), schedule))
    return Teacher(network, config, image_seq_len=image_seq_len), network


def visited_sigmas(teacher: Teacher, network: RecordingNetwork) -> torch.Tensor:
    return torch.stack([teacher.schedule.sigma_at(t)[0] for _, t in network.calls]).float()


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_euler_visits_the_sd3_pipelines_sigmas(steps):
    teacher, network = flow_teacher(SD3)
    sample_teacher(teacher, None, (8, 2), steps, torch.Generator().manual_seed(0), solver="euler")
    reference = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    reference.set_timesteps(steps)  # what StableDiffusion3Pipeline does
    torch.testing.assert_close(visited_sigmas(teacher, network), reference.sigmas[:-1])
    assert visited_sigmas(teacher, network)[0] == 1.0  # x = ε at σ = 1
    model_timesteps = torch.stack([teacher.schedule.model_timestep(t)[0] for _, t in network.calls])
    torch.testing.assert_close(model_timesteps, reference.timesteps)  # the transformer's timestep input


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_euler_visits_the_flux_pipelines_sigmas(steps):
    teacher, network = flow_teacher(FLUX, image_seq_len=1024)
    sample_teacher(teacher, None, (8, 2), steps, torch.Generator().manual_seed(0), solver="euler")
    reference = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    # FluxPipeline: linspace(1, 1/n, n) shifted by e^μ, μ from the image's token count
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(visited_sigmas(teacher, network), reference.sigmas[:-1])


@pytest.mark.parametrize("steps", [1, 4, 20])
def test_flow_dpmpp_visits_the_sana_pipelines_sigmas(steps):
    teacher, network = flow_teacher(SANA)
    sample_teacher(teacher, None, (8, 2), steps, torch.Generator().manual_seed(0), solver="flow-dpmpp")
    reference = DPMSolverMultistepScheduler.from_config(SANA)
    reference.set_timesteps(steps)
    torch.testing.assert_close(visited_sigmas(teacher, network), reference.sigmas[:-1])


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_euler_sample_equals_the_pipelines_euler_loop(steps):
    """The pipelines' loop: the transformer's velocity at each σ, straight into the scheduler's step."""
    teacher, _ = flow_teacher(SD3)
    mixture = teacher.unet.net.mixture
    x = sample_teacher(teacher, None, (64, 2), steps, torch.Generator().manual_seed(1), solver="euler")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    scheduler.set_timesteps(steps)
    latents = torch.randn((64, 2), generator=torch.Generator().manual_seed(1))
    for t in scheduler.timesteps:
        v = velocity_field(mixture, latents, t / 1000)  # the transformer takes σ·T
        latents = scheduler.step(v, t, latents).prev_sample
    torch.testing.assert_close(x, latents, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_flow_dpmpp_sample_equals_the_sana_loop_on_flow_prediction(steps):
    teacher, _ = flow_teacher(SANA)
    mixture = teacher.unet.net.mixture
    x = sample_teacher(teacher, None, (64, 2), steps, torch.Generator().manual_seed(1), solver="flow-dpmpp")
    scheduler = DPMSolverMultistepScheduler.from_config(SANA)
    scheduler.set_timesteps(steps)
    latents = torch.randn((64, 2), generator=torch.Generator().manual_seed(1))
    for i, t in enumerate(scheduler.timesteps):
        v = velocity_field(mixture, latents, scheduler.sigmas[i])
        latents = scheduler.step(v, t, latents).prev_sample
    torch.testing.assert_close(x, latents, rtol=0, atol=1e-5)


def test_flow_teacher_converges_and_defaults_to_euler():
    teacher, _ = flow_teacher(SD3)
    g = torch.Generator().manual_seed(0)
    mixture = GaussianMixture()
    radius = {n: sample_teacher(teacher, None, (512, 2), n, g).norm(dim=1) for n in (1, 50)}
    assert radius[1].mean() < 0.1  # one step from σ = 1 lands on the mean
    assert (radius[50] - 1).abs().mean() < 3 * mixture.std  # 50 steps land on the ring of modes


def test_solvers_of_the_other_path_are_refused_by_name():
    ddpm = Teacher(ExactDenoiser(GaussianMixture(), NoiseSchedule.from_scheduler_config(TOY_SCHEDULER)), TOY_SCHEDULER)
    flow, _ = flow_teacher(SD3)
    assert set(TEACHER_SOLVERS) == {"ddim", "dpmpp", *FLOW_SOLVERS}
    for solver in FLOW_SOLVERS:
        with pytest.raises(ValueError, match=rf"'{solver}' for a DDPM teacher: allowed are ddim, dpmpp$"):
            sample_teacher(ddpm, None, (4, 2), 2, solver=solver)
    allowed = "allowed are euler, flow-dpmpp$"
    for solver in ("ddim", "dpmpp", "heun"):
        with pytest.raises(ValueError, match=rf"'{solver}' for a flow-matching teacher: {allowed}"):
            sample_teacher(flow, None, (4, 2), 2, solver=solver)


def test_eval_sampler_names_are_the_samplers_solvers():
    from workers.eval import samplers

    assert samplers.TEACHER_SOLVERS == TEACHER_SOLVERS
    assert all(solver in samplers.SOLVER_NAMES for solver in TEACHER_SOLVERS)


# --- the student sampler ----------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_student_starts_at_sigma_one_and_renoises_on_the_flow_path(steps):
    teacher, _ = flow_teacher(SD3)
    student = Student(teacher, network=RecordingNetwork(MLPDenoiser()))
    noise = student_noise((16, 2), steps, torch.Generator().manual_seed(0))
    x0 = sample_student(student, None, (16, 2), steps, noise=noise)
    calls, schedule = list(student.unet.calls), student.schedule  # a copy: re-evaluating below records too
    assert len(calls) == steps
    x_first, t_first = calls[0]
    assert t_first.tolist() == [999] * 16 and schedule.sigma_at(t_first)[0] == 1.0
    assert torch.equal(x_first, noise[0])
    for i in range(1, steps):
        previous_x, previous_t = calls[i - 1]
        x0_previous = student.denoise(previous_x, previous_t, Conditioning())
        x_t, t = calls[i]
        sigma = schedule.sigma(t, x_t)
        assert 0 < sigma[0] < schedule.sigma(previous_t, x_t)[0]
        torch.testing.assert_close(x_t, (1 - sigma) * x0_previous + sigma * noise[i])
    torch.testing.assert_close(x0, student.denoise(*calls[-1], Conditioning()))


# --- the distillation step on the flow path ---------------------------------------------------


def test_the_pure_noise_index_is_left_out_of_the_teachers_t_only_where_alpha_is_zero():
    assert distillation_timesteps(FlowMatchSchedule(1000, 3.0)) == 999
    assert distillation_timesteps(NoiseSchedule.from_scheduler_config(TOY_SCHEDULER)) == 1000
    zsnr = NoiseSchedule.from_scheduler_config(TOY_SCHEDULER, zero_terminal_snr=True)
    assert distillation_timesteps(zsnr) == 1000  # α_T = 2^-12 there, not 0


def test_nfsd_at_the_pure_noise_index_would_not_be_finite():
    """Why the index is left out: NFSD's σ_t/α_t at α = 0; the last index kept stays finite."""
    schedule = FlowMatchSchedule(1000, 3.0)
    loss = DistillationLoss("nfsd")
    x = torch.randn(4, 2)
    for t, finite in ((999, False), (998, True)):
        t = torch.full((4,), t)
        target = loss.target(x, torch.zeros_like(x), torch.randn(4, 2), x, t, schedule, 3.0)
        value = loss(x, target, loss.c(schedule, t, x))
        assert bool(torch.isfinite(value).all()) == finite


@pytest.mark.parametrize("w", ["uniform", "snr"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_one_add_step_on_a_flow_teacher_is_finite_for_every_weighting(weighting, w):
    torch.manual_seed(0)
    mixture = GaussianMixture()
    # SD3's shift: the last index kept, 998, has α = 3.3e-4, NFSD's σ/α ≈ 3,000
    schedule = schedule_from_scheduler_config(SD3)
    teacher = Teacher(ExactDenoiser(mixture, schedule), SD3)
    student = Student(teacher, network=MLPDenoiser())
    models = ADDModels(student, teacher, ToyDiscriminator())
    objective = ADDObjective(distill=DistillationLoss(weighting, w=w), r1=R1Penalty(gamma=0.1), guidance_scale=2.0)
    g = torch.Generator().manual_seed(0)
    # a large batch: the teacher's t covers the whole range, up to the last index kept (998)
    batch = ADDBatch.from_pixels(teacher, mixture.sample(4096, g), Conditioning())
    params = student.trainable_parameters()
    update = Update(params, torch.optim.SGD(params, lr=0.0))
    update.zero_grad()
    metrics, fake = student_backward(models, objective, batch, update, g)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["loss/distill"] > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert sum(float(p.grad.norm()) for p in params) > 0
    opt_d = torch.optim.Adam(models.discriminator.trainable_parameters(), lr=1e-3)
    d_metrics = discriminator_step(models, objective, batch, fake, opt_d, 0, g)
    assert all(math.isfinite(v) for v in d_metrics.values()), d_metrics


# --- the toy proof ----------------------------------------------------------------------------


def test_add_one_step_flow_student_beats_the_teachers_one_step_euler_sample():
    run = run_toy(schedule="flow")
    w1 = run["sliced_w1"]
    # measured with the defaults (seed 0, shift 1): teacher Euler 1-step 0.636 (the mixture's mean), student
    # before ADD 0.567, ADD student 1-step 0.097, teacher Euler 50-step 0.027; data vs fresh data 0.016.
    # Seeds 1-5: ADD student 1-step 0.081-0.231, at most 0.36 x the teacher's one-step Euler sample
    assert w1["student 1-step"] < 0.4 * w1["teacher Euler 1-step"]
    assert w1["student 1-step"] < 0.4 * w1["student 1-step before ADD"]
    assert w1["teacher Euler 50-step"] < 0.1  # the reference: the exact teacher at 50 steps is right
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in run["history"])
    with pytest.raises(ValueError, match="unknown toy schedule 'edm': allowed are ddpm, flow"):
        run_toy(schedule="edm")
    with pytest.raises(ValueError, match="needs schedule='flow'"):
        run_toy(flow_shift=3.0)
    assert TOY_FLOW_SCHEDULER["shift"] == 1.0 and "shift" not in TOY_SCHEDULER


def test_addctl_toy_runs_the_flow_teacher_and_refuses_a_shift_without_it(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    runner = CliRunner()
    args = ["toy", "--steps", "5", "--schedule", "flow", "--shift", "3", "--out", str(tmp_path)]
    result = runner.invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "| teacher Euler 1-step |" in result.output and "DDIM" not in result.output
    assert (tmp_path / "samples.png").stat().st_size > 0
    refused = runner.invoke(main, ["toy", "--shift", "3"])
    assert refused.exit_code == 2 and "--shift" in refused.output and "--schedule flow" in refused.output
