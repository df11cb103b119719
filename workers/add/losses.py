"""The ADD losses as small callables returning per-sample tensors (EDM ``training/loss.py`` style).

The step only weights, reduces and backpropagates. Paper references: Sauer et al. 2023, ADD §3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.add.schedule import NoiseSchedule

WEIGHTINGS = ("exponential", "sds", "nfsd")


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


@dataclass
class HingeLoss:
    """Hinge GAN loss summed over discriminator heads k, averaged over each head's tokens.

    L_D = Σ_k max(0, 1 − D_k(real)) + Σ_k max(0, 1 + D_k(fake))      (ADD §3.1, StyleGAN-T)
    L_G = −Σ_k D_k(fake)
    """

    def discriminator(self, real_logits: list[Tensor], fake_logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-sample (real, fake) terms of L_D."""
        real = sum(_per_sample_mean(torch.relu(1 - r)) for r in real_logits)
        fake = sum(_per_sample_mean(torch.relu(1 + f)) for f in fake_logits)
        return real, fake

    def generator(self, fake_logits: list[Tensor]) -> Tensor:
        """Per-sample L_G."""
        return -sum(_per_sample_mean(f) for f in fake_logits)


@dataclass
class R1Penalty:
    """R1 = ‖∇_f Σ D(f)‖² at each head's input f (not the pixels), weighted by γ.

    Lazy regularisation (StyleGAN2): applied every ``interval`` D steps, scaled by ``interval`` so
    its expected weight is unchanged.
    """

    gamma: float = 1e-5
    interval: int = 1

    def due(self, step: int) -> bool:
        return self.gamma > 0 and step % self.interval == 0

    def __call__(self, head_inputs: list[Tensor], real_logits: list[Tensor]) -> Tensor:
        """Per-sample γ·interval·Σ_k ‖∂ΣD_k/∂f_k‖²; ``head_inputs`` must require grad."""
        grads = torch.autograd.grad(
            outputs=[logit.sum() for logit in real_logits], inputs=head_inputs, create_graph=True
        )
        penalty = sum(g.square().flatten(1).sum(1) for g in grads)
        return self.gamma * self.interval * penalty


@dataclass
class DistillationLoss:
    """L_distill = c(t)·‖x̂θ − sg(x̂ψ)‖², per sample (ADD Eq. 4), weighted by λ in the step.

    c(t) (ADD §3.2, App. C):
      - ``exponential``: c = α_t (the ablation default).
      - ``sds``:  c = α_t / (2σ_t) · w(t): its gradient equals score distillation sampling,
        w(t)(ε̂ψ − ε′), since ε̂ψ − ε′ = (α_t/σ_t)(x̂θ − x̂ψ).
      - ``nfsd``: noise-free score distillation (Katzir et al. 2023): SDS with the direction
        ε̂ψ − ε′ replaced by δ = δ_D + s·δ_C, δ_C = ε̂(c) − ε̂(∅) and δ_D = ε̂(∅) for t < 200
        (no negative prompt, so δ_D = 0 above). Written as an x0 target,
        x̂ψ = x̂θ − (σ_t/α_t)·δ, so c(t) is the SDS one.
    ``w(t)``: ``uniform`` (1) or ``snr`` (α_t²/σ_t²) — DreamFusion leaves it open (ours).
    """

    weighting: str = "exponential"
    w: str = "uniform"
    nfsd_t_threshold: int = 200

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown distillation weighting {self.weighting!r}: allowed are {', '.join(WEIGHTINGS)}"
            )
        if self.w not in ("uniform", "snr"):
            raise ValueError(f"unknown SDS w(t) {self.w!r}: allowed are uniform, snr")

    def c(self, schedule: NoiseSchedule, t: Tensor, like: Tensor) -> Tensor:
        """c(t), broadcastable against ``like``."""
        alpha_t, sigma_t = schedule.alpha(t, like), schedule.sigma(t, like)
        if self.weighting == "exponential":
            return alpha_t
        w_t = torch.ones_like(alpha_t) if self.w == "uniform" else (alpha_t / sigma_t) ** 2
        return alpha_t / (2 * sigma_t) * w_t

    def target(
        self,
        x_hat_theta: Tensor,
        x0_cond: Tensor,
        x0_uncond: Tensor,
        x_t: Tensor,
        t: Tensor,
        schedule: NoiseSchedule,
        guidance_scale: float,
    ) -> Tensor:
        """sg(x̂ψ): the teacher's guided x0, or the NFSD target; never carries gradient."""
        if self.weighting != "nfsd":
            return (x0_uncond + guidance_scale * (x0_cond - x0_uncond)).detach()
        eps_cond = schedule.eps_from_x0(x0_cond, x_t, t)
        eps_uncond = schedule.eps_from_x0(x0_uncond, x_t, t)
        small_t = (t.reshape(-1) < self.nfsd_t_threshold).to(x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        delta = small_t * eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        return (x_hat_theta - schedule.sigma(t, x_t) / schedule.alpha(t, x_t) * delta).detach()

    def __call__(self, x_hat_theta: Tensor, x_hat_psi: Tensor, c_t: Tensor) -> Tensor:
        """Per-sample c(t)·mean‖x̂θ − sg(x̂ψ)‖² (x̂ψ is detached here too, whatever the caller did)."""
        return _per_sample_mean(c_t * (x_hat_theta - x_hat_psi.detach()).square())
