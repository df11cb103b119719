"""Hinge, R1 and each c(t) against values computed by hand."""

import math

import pytest
import torch

from workers.add.losses import DistillationLoss, HingeLoss, R1Penalty
from workers.add.schedule import NoiseSchedule

CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def test_hinge_by_hand():
    real = [torch.tensor([[0.5, 2.0], [-1.0, 0.0]]), torch.tensor([[3.0], [0.2]])]
    fake = [torch.tensor([[-0.5, -2.0], [1.0, 0.0]]), torch.tensor([[0.0], [-3.0]])]
    l_real, l_fake = HingeLoss().discriminator(real, fake)
    # sample 0: head 1 mean(max(0,1-0.5), max(0,1-2)) = 0.25, head 2 max(0, 1-3) = 0
    # sample 1: head 1 mean(2, 1) = 1.5, head 2 0.8
    torch.testing.assert_close(l_real, torch.tensor([0.25, 2.3]))
    # fake sample 0: mean(0.5, 0) + 1 = 1.25; sample 1: mean(2, 1) + 0 = 1.5
    torch.testing.assert_close(l_fake, torch.tensor([1.25, 1.5]))
    torch.testing.assert_close(HingeLoss().generator(fake), torch.tensor([1.25 - 0.0, -0.5 + 3.0]))


def test_r1_is_gamma_times_squared_gradient_at_head_inputs():
    w = torch.tensor([[1.0, -2.0, 0.5]])  # a linear head: logit per token = w · f
    feats = [torch.randn(2, 3, 4, requires_grad=True)]  # (B, C, N tokens)
    logits = [torch.einsum("oc,bcn->bn", w, feats[0])]
    r1 = R1Penalty(gamma=0.1, interval=4)(feats, logits)
    # ∂Σ logits / ∂f = w at every token: ‖·‖² = N·‖w‖² = 4 · 5.25 = 21 ; γ · interval · 21
    torch.testing.assert_close(r1, torch.full((2,), 0.1 * 4 * 21.0))
    assert R1Penalty(interval=4).due(8) and not R1Penalty(interval=4).due(9)
    assert not R1Penalty(gamma=0.0).due(0)


@pytest.mark.parametrize("weighting", ["exponential", "sds", "nfsd"])
def test_c_t_by_hand(weighting):
    s = NoiseSchedule.from_scheduler_config(CONFIG, prediction_type="epsilon")
    betas = [1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)]
    alpha_bar = math.prod(1 - b for b in betas[:301])
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    c = DistillationLoss(weighting).c(s, torch.tensor([300]), torch.zeros(1, 2)).item()
    expected = alpha if weighting == "exponential" else alpha / (2 * sigma)
    assert c == pytest.approx(expected, rel=1e-5)
    c_snr = DistillationLoss("sds", w="snr").c(s, torch.tensor([300]), torch.zeros(1, 2)).item()
    assert c_snr == pytest.approx(alpha / (2 * sigma) * alpha**2 / sigma**2, rel=1e-5)


def test_distillation_loss_value_and_stop_gradient():
    x_theta = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
    x_psi = torch.tensor([[0.0, 0.0], [1.0, 3.0]], requires_grad=True)
    c_t = torch.tensor([[2.0], [0.5]])
    loss = DistillationLoss()(x_theta, x_psi, c_t)
    torch.testing.assert_close(loss, torch.tensor([2.0 * 2.5, 0.5 * 5.0]))
    loss.sum().backward()
    assert x_psi.grad is None and x_theta.grad is not None


def test_sds_gradient_equals_score_distillation():
    """With c = α/(2σ), ∇x̂θ of c‖x̂θ − x̂ψ‖² is (ε̂ψ − ε′) (ADD App. C), summed form."""
    s = NoiseSchedule.from_scheduler_config(CONFIG, prediction_type="epsilon")
    t = torch.tensor([400])
    x_theta = torch.randn(1, 3, requires_grad=True)
    eps_prime, x_psi = torch.randn(1, 3), torch.randn(1, 3)
    x_t = s.add_noise(x_theta.detach(), eps_prime, t)
    loss_fn = DistillationLoss("sds")
    (loss_fn(x_theta, x_psi, loss_fn.c(s, t, x_theta)) * 3).sum().backward()  # ×3 undoes the mean
    eps_hat = s.eps_from_x0(x_psi, x_t, t)
    torch.testing.assert_close(x_theta.grad, eps_hat - eps_prime, rtol=1e-4, atol=1e-5)


def test_nfsd_target_moves_along_the_guidance_direction():
    s = NoiseSchedule.from_scheduler_config(CONFIG, prediction_type="epsilon")
    loss = DistillationLoss("nfsd")
    x_theta, x_t = torch.zeros(1, 2), torch.ones(1, 2)
    x0_c, x0_u = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2)
    t = torch.tensor([500])  # ≥ 200: δ = s·δ_C only
    target = loss.target(x_theta, x0_c, x0_u, x_t, t, s, guidance_scale=2.0)
    # δ_C = ε(c) − ε(∅) = −(α/σ)(x0_c − x0_u); target = x̂θ − (σ/α)·2·δ_C = 2·(x0_c − x0_u)
    torch.testing.assert_close(target, torch.tensor([[2.0, 0.0]]))


def test_unknown_weighting_is_named():
    with pytest.raises(ValueError, match="unknown distillation weighting 'l2'.*exponential, sds, nfsd"):
        DistillationLoss("l2")
