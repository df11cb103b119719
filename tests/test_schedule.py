"""The schedule: α_t, σ_t, zero terminal SNR and the ε / v / x0 conversions."""

import math

import pytest
import torch

from workers.add.schedule import PREDICTION_TYPES, NoiseSchedule
from workers.add.student import Student, check_student_timesteps, student_timesteps
from workers.add.teacher import Teacher
from workers.add.toy import MLPDenoiser

CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}


def test_alpha_sigma_match_hand_computed_scaled_linear_betas():
    s = NoiseSchedule.from_scheduler_config(CONFIG, prediction_type="epsilon")
    betas = [
        (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)
    ]
    alpha_bar_500 = math.prod(1 - b for b in betas[:501])
    x = torch.zeros(1, 1)
    assert s.alpha(torch.tensor([500]), x).item() == pytest.approx(math.sqrt(alpha_bar_500), rel=1e-5)
    assert s.sigma(torch.tensor([500]), x).item() == pytest.approx(math.sqrt(1 - alpha_bar_500), rel=1e-5)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_conversions_round_trip(prediction_type, zero_terminal_snr):
    s = NoiseSchedule.from_scheduler_config(CONFIG, zero_terminal_snr, prediction_type)
    x0, eps = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 10, 250, 500, 900, 998])
    x_t = s.add_noise(x0, eps, t)
    out = s.from_x0(x0, x_t, t)
    torch.testing.assert_close(s.to_x0(out, x_t, t), x0)
    # and the output is the right quantity for its type
    expected = {"epsilon": eps, "sample": x0, "v_prediction": s.alpha(t, x0) * eps - s.sigma(t, x0) * x0}
    torch.testing.assert_close(out, expected[prediction_type])


def test_zero_terminal_snr_makes_the_last_timestep_pure_noise():
    plain = NoiseSchedule.from_scheduler_config(CONFIG, zero_terminal_snr=False, prediction_type="epsilon")
    zsnr = NoiseSchedule.from_scheduler_config(CONFIG, zero_terminal_snr=True, prediction_type="epsilon")
    x0, eps, t = torch.randn(2, 4), torch.randn(2, 4), torch.tensor([999, 999])
    assert plain.alpha(t, x0)[0].item() > 0.05  # SD's schedule leaves signal at t = 999
    assert zsnr.alpha(t, x0)[0].item() < 3e-4
    torch.testing.assert_close(zsnr.add_noise(x0, eps, t), eps, atol=1e-3, rtol=0)
    assert zsnr.zero_terminal_snr and not plain.zero_terminal_snr


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="unknown prediction type 'flow'.*epsilon, v_prediction, sample"):
        NoiseSchedule.from_scheduler_config(CONFIG, prediction_type="flow")


def test_student_timesteps_trailing_and_validation():
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(1) == [999]
    assert check_student_timesteps([699, 999, 899, 799], 1000) == [999, 899, 799, 699]
    with pytest.raises(ValueError, match=r"\[1000\] out of range.*0\.\.999"):
        check_student_timesteps([999, 1000], 1000)
    with pytest.raises(ValueError, match="duplicates"):
        check_student_timesteps([999, 999], 1000)
    teacher = Teacher(MLPDenoiser(), {**CONFIG, "prediction_type": "sample"})
    with pytest.raises(ValueError, match="out of range"):
        Student(teacher, timesteps=[-1, 500])
