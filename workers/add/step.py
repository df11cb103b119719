"""One ADD iteration: ``student_step()`` then ``discriminator_step()``; ``student_sample()`` gives the
fake of any extra heads' update a loop runs before it.

There is one update path. ``student_backward()`` (steps 2–7) and ``discriminator_backward()`` (step 8)
accumulate one micro-batch's gradient into an ``Update``, which clips to ``max_grad_norm`` and steps the
optimizer. The two ``*_step`` functions are that for one batch in one process; the Ray Train loop
(``workers.train.loop``) calls the same two per micro-batch and wraps what is distributed around them:
the all-reduce of the gradients, the full norm of a sharded gradient, finiteness agreed across ranks.

Numbered comments follow "One training iteration" in ADD_METHOD.md. Sections are labelled with
``torch.profiler.record_function`` ("add/student", "add/teacher", "add/discriminator") so a
profiler splits the step's time at no cost when none is running.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from workers.add.balance import Balance, output_balance, separability, split_backward
from workers.add.conditioning import Conditioning
from workers.add.losses import DistillationLoss, HingeLoss, R1Penalty
from workers.add.schedule import NoiseSchedule
from workers.add.student import Student
from workers.add.teacher import Teacher

DISTILL_SPACES = ("pixel", "latent")


@dataclass
class ADDModels:
    """θ, ψ and D = (F, D_φ,k)."""

    student: Student
    teacher: Teacher
    discriminator: nn.Module


@dataclass
class ADDObjective:
    """The loss terms of one iteration and how they are weighted (ADD §3)."""

    distill: DistillationLoss = field(default_factory=DistillationLoss)
    hinge: HingeLoss = field(default_factory=HingeLoss)
    r1: R1Penalty = field(default_factory=R1Penalty)
    lambda_distill: float = 2.5  # λ, the paper's value (on a per-element mean: see workers.add.balance)
    balance: Balance = field(default_factory=Balance)  # λ_adv, the weight of L_G: fixed (1) or adaptive
    guidance_scale: float = 3.0  # teacher CFG scale for the distillation target (ours: not in the paper)
    distill_space: str = "pixel"  # latent teachers: distance on decoded pixels (paper) or on latents
    max_grad_norm: float | None = None  # clip θ and φ gradients to this total norm

    def __post_init__(self):
        if self.distill_space not in DISTILL_SPACES:
            raise ValueError(f"unknown distill_space {self.distill_space!r}: allowed are {', '.join(DISTILL_SPACES)}")


@dataclass
class ADDBatch:
    """Real data for one iteration: x0 in the model's space, the pixels, and the captions' c."""

    x0: Tensor
    pixels: Tensor
    cond: Conditioning

    @classmethod
    def from_pixels(cls, teacher: Teacher, pixels: Tensor, cond: Conditioning) -> ADDBatch:
        """Encode pixels in [-1, 1] to the teacher's latents when it has a VAE."""
        if teacher.codec is None:
            return cls(pixels, pixels, cond)
        with torch.no_grad():
            return cls(teacher.codec.encode(pixels), pixels, cond)


def _randn(like: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(like.shape, generator=generator, device="cpu", dtype=torch.float32).to(like)


def _to_pixels(teacher: Teacher, x: Tensor) -> Tensor:
    return x if teacher.codec is None else teacher.codec.decode(x)


def _discriminator_input(models: ADDModels, x: Tensor) -> Tensor:
    """D sees decoded pixels when its feature network works on pixels (DINOv2), else model space."""
    return _to_pixels(models.teacher, x) if models.discriminator.input_space == "pixel" else x


def _real_for_discriminator(models: ADDModels, batch: ADDBatch) -> Tensor:
    return batch.pixels if models.discriminator.input_space == "pixel" else batch.x0


@dataclass
class Update:
    """One optimizer step of ``params``, their gradient accumulated over ``micro_batches`` backward
    passes (each scaled by 1/micro_batches); the one place where ``max_grad_norm`` clips.

    A caller zeroes it, runs ``student_backward`` or ``discriminator_backward`` once per micro-batch,
    then ``clip()`` and ``step()``; a distributed loop reduces the gradients across ranks before
    ``clip()`` and checks finiteness on every rank between the two.
    """

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    max_grad_norm: float | None = None  # None: no clipping (the norm is still measured)
    micro_batches: int = 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self) -> Tensor:
        """Clip the accumulated gradient to ``max_grad_norm``; its total norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or math.inf)

    def step(self) -> None:
        self.optimizer.step()


@contextmanager
def frozen(params: list[nn.Parameter]) -> Iterator[None]:
    """No gradient accumulates into ``params`` inside (the heads during the student's loss)."""
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)


def distillation_timesteps(schedule: NoiseSchedule) -> int:
    """How many teacher timesteps t ∈ 0..n−1 the distillation loss draws from: those with α_t > 0.

    The one place the teacher's t range is decided. A flow teacher's last index is σ = 1, α = 0: there
    x̂ψ ignores its input, every c(t) is 0 and NFSD's σ_t/α_t is infinite (0·∞ = NaN), so it is left out.
    A DDPM schedule keeps all T (with zero terminal SNR its α_T is 2^-12, not 0).
    """
    return int(torch.nonzero(schedule.alphas > 0).max()) + 1


def sample_teacher_timesteps(schedule: NoiseSchedule, batch_size: int, generator: torch.Generator | None) -> Tensor:
    """5. t ~ U{0..n−1} over ``distillation_timesteps``, one per sample (CPU)."""
    return torch.randint(distillation_timesteps(schedule), (batch_size,), generator=generator)


def _student_prediction(student: Student, batch: ADDBatch, generator: torch.Generator | None) -> Tensor:
    """Steps 2–4: x̂θ(x_s, s, c) as an x0-estimate of the batch re-noised to a student timestep."""
    x0 = batch.x0
    # 2. s ~ U(T_student)
    s = student.sample_timesteps(x0.shape[0], generator).to(x0.device)
    # 3. x_s = α_s·x0 + σ_s·ε with the student's own (zero-terminal-SNR) schedule
    x_s = student.schedule.add_noise(x0, _randn(x0, generator), s)
    # 4. x̂θ(x_s, s, c), whatever the model's prediction type
    return student.denoise(x_s, s, batch.cond)


@torch.no_grad()
def student_sample(models: ADDModels, batch: ADDBatch, generator: torch.Generator | None = None) -> Tensor:
    """sg(x̂θ) in D's input space from steps 2–4 on a fresh batch: the fake of an extra heads' update
    (``train.discriminator_steps`` > 1, ours), drawn exactly as the student's own step draws it."""
    with record_function("add/student"):
        return _discriminator_input(models, _student_prediction(models.student, batch, generator))


@dataclass
class StudentGradients:
    """Steps 2–6 done: x̂θ with θ's graph, and each loss's gradient at x̂θ (all of θ's gradient passes
    through x̂θ, so step 7 is one backward from there; ``workers.add.balance``)."""

    x_hat_theta: Tensor
    g_adv: Tensor  # λ_adv·∂L_G/∂x̂θ (batch mean), λ_adv as the balance set it
    g_distill: Tensor  # ∂(λ·L_distill)/∂x̂θ (batch mean)

    def backward(self, scale: float = 1.0, split: list[nn.Parameter] | None = None) -> dict[str, float]:
        """7. θ's backward (gradients accumulate; ψ, F and the heads get none: x̂θ's graph holds θ alone).

        ``split``: θ's parameters, to run it as two passes and return ‖∇θ‖ of each term and their cosine.
        """
        if split is not None:
            return split_backward(self.x_hat_theta, self.g_adv * scale, self.g_distill * scale, split)
        self.x_hat_theta.backward((self.g_adv + self.g_distill) * scale)
        return {}


def student_loss(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    generator: torch.Generator | None = None,
) -> tuple[StudentGradients, dict[str, float], Tensor]:
    """Steps 2–6: L_G and λ·L_distill, their gradients at x̂θ weighted by the balance, the metrics, and
    sg(x̂θ) in D's space. Nothing is backpropagated into θ yet: ``StudentGradients.backward`` does it.

    ``student_backward`` is this plus θ's backward; ``student_step`` that plus the optimizer step.
    """
    student, teacher, D = models.student, models.teacher, models.discriminator
    x0, cond = batch.x0, batch.cond
    with record_function("add/student"):
        # 2–4. x̂θ; NOT detached: both losses must reach θ
        x_hat_theta = _student_prediction(student, batch, generator)

    with record_function("add/teacher"):
        # 5. re-noise sg(x̂θ) to t ~ U(teacher timesteps) with fresh ε′; one teacher call
        t = sample_teacher_timesteps(teacher.schedule, x0.shape[0], generator).to(x0.device)
        x_hat_theta_t = teacher.schedule.add_noise(x_hat_theta.detach(), _randn(x0, generator), t)
        with torch.no_grad():
            if objective.guidance_scale == 1.0 and objective.distill.weighting != "nfsd":
                x0_cond = x0_uncond = teacher.denoise(x_hat_theta_t, t, cond)  # no guidance: one pass
            else:
                x0_cond, x0_uncond = teacher.denoise_cond_uncond(x_hat_theta_t, t, cond)
            x_hat_psi = objective.distill.target(
                x_hat_theta, x0_cond, x0_uncond, x_hat_theta_t, t, teacher.schedule, objective.guidance_scale
            )
        c_t = objective.distill.c(teacher.schedule, t, x0)
        if objective.distill_space == "pixel" and teacher.codec is not None:
            # the paper computes the distance on decoded pixels: "more stable gradients"
            with torch.no_grad():
                x_hat_psi = teacher.codec.decode(x_hat_psi)
            l_distill = objective.distill(teacher.codec.decode(x_hat_theta), x_hat_psi, c_t)
        else:
            l_distill = objective.distill(x_hat_theta, x_hat_psi, c_t)

    with record_function("add/discriminator"):
        # 6. L_G = −Σ_k D_k(F_k(x̂θ), c): gradient flows through frozen F into x̂θ
        fake = _discriminator_input(models, x_hat_theta)
        fake_logits = _fake_logits(D, fake, batch, _real_for_discriminator(models, batch), generator)
        l_g = objective.hinge.generator(fake_logits)
        # each term's gradient at x̂θ (no gradient for ψ, F or the heads), then λ_adv from the balance
        g_adv = _grad_at(l_g.mean(), x_hat_theta, needed=objective.balance.needs_adv_gradient)
    g_distill = _grad_at(objective.lambda_distill * l_distill.mean(), x_hat_theta, needed=objective.lambda_distill > 0)
    lambda_adv = objective.balance.weight(g_adv.float().norm(), g_distill.float().norm())

    metrics = {
        "loss/student": float(lambda_adv * l_g.detach().mean() + objective.lambda_distill * l_distill.detach().mean()),
        "loss/G_adv": float(l_g.detach().mean()),
        "loss/distill": float(l_distill.detach().mean()),
        "logits/fake_G": float(torch.stack([f.detach().mean() for f in fake_logits]).mean()),
        **output_balance(g_adv, g_distill, lambda_adv),
    }
    return StudentGradients(x_hat_theta, lambda_adv.to(g_adv.dtype) * g_adv, g_distill), metrics, fake.detach()


def _fake_logits(D: nn.Module, fake: Tensor, batch: ADDBatch, real: Tensor, generator) -> list[Tensor]:
    """D_k(F_k(x̂θ), c); with the heads' batch-norm groups mixed, beside the real batch as in step 8."""
    if not D.mix_real_fake:
        return D(fake, batch.cond, x_real=real, generator=generator)
    with torch.no_grad():
        feats_real, c_real = D.features(real, batch.cond, real, generator)
    feats_fake, c_fake = D.features(fake, batch.cond, real, generator)
    return D.paired_logits(feats_real, feats_fake, c_real, c_fake)[1]


def _grad_at(loss: Tensor, x: Tensor, needed: bool) -> Tensor:
    """∂loss/∂x, keeping the graph for θ's backward; zeros when the term is switched off."""
    if not needed:
        return torch.zeros_like(x)
    return torch.autograd.grad(loss, x, retain_graph=True)[0]


def student_backward(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    update: Update,
    generator: torch.Generator | None = None,
    measure: bool = False,
    autocast: AbstractContextManager | None = None,
) -> tuple[dict[str, float], Tensor]:
    """Steps 2–7 on one (micro-)batch: θ's gradient of L_G + λ·L_distill accumulates into ``update``;
    returns metrics and sg(x̂θ) in D's input space. ``autocast`` wraps the forward passes only.

    ``measure``: also split θ's gradient into its two terms (``balance/*_theta``; one more backward).
    """
    # 2–6 with the heads frozen: L_G reaches θ through F and the heads, and leaves no gradient in them
    with frozen(models.discriminator.trainable_parameters()), autocast or nullcontext():
        grads, metrics, fake = student_loss(models, objective, batch, generator)
    with record_function("add/student"):
        # 7. θ's backward only: ψ, F and the heads get no gradient from this loss
        split = update.params if measure else None
        metrics |= grads.backward(scale=1 / update.micro_batches, split=split)
    return metrics, fake


def student_step(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator | None = None,
    measure: bool = False,
) -> tuple[dict[str, float], Tensor]:
    """Update θ on L_G + λ·L_distill; returns metrics and sg(x̂θ) in D's input space.

    ``measure``: also split θ's gradient into its two terms (``balance/*_theta``; one more backward).
    """
    update = Update(models.student.trainable_parameters(), optimizer, objective.max_grad_norm)
    update.zero_grad()
    metrics, fake = student_backward(models, objective, batch, update, generator, measure)
    if not math.isfinite(metrics["loss/student"]):
        raise FloatingPointError(
            f"non-finite student loss: L_G={metrics['loss/G_adv']:.4g} L_distill={metrics['loss/distill']:.4g}"
        )
    with record_function("add/student"):  # 7. θ's update: clip, step
        metrics["grad_norm/student"] = float(update.clip())
        update.step()
    return metrics, fake


def discriminator_loss(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    fake: Tensor,
    step: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Step 8's loss: hinge on real and sg(fake), plus γ·R1 on lazy steps; not yet backpropagated."""
    D = models.discriminator
    real = _real_for_discriminator(models, batch)
    with record_function("add/discriminator"):
        with torch.no_grad():  # F is frozen; R1 needs gradients at the heads' inputs only
            # one F call on [real; fake] (half the calls of two); the heads still see them apart
            both = torch.cat([real, fake.detach()])
            feats, c = D.features(both, Conditioning.cat([batch.cond, batch.cond]), torch.cat([real, real]), generator)
        feats_real, feats_fake = zip(*(f.chunk(2) for f in feats), strict=True)
        c_real, c_fake = c.chunk(2) if c is not None else (None, None)
        apply_r1 = objective.r1.due(step)
        feats_real = [f.detach().requires_grad_(apply_r1) for f in feats_real]
        real_logits, fake_logits = D.paired_logits(feats_real, list(feats_fake), c_real, c_fake)
        l_real, l_fake = objective.hinge.discriminator(real_logits, fake_logits)
        r1 = objective.r1(feats_real, real_logits) if apply_r1 else torch.zeros_like(l_real)
        loss = (l_real + l_fake + r1).mean()
    return loss, {
        "loss/D": float(loss.detach()),
        "loss/D_real": float(l_real.detach().mean()),
        "loss/D_fake": float(l_fake.detach().mean()),
        "loss/R1": float(r1.detach().mean()),
        "logits/real": float(torch.stack([r.detach().mean() for r in real_logits]).mean()),
        "logits/fake": float(torch.stack([f.detach().mean() for f in fake_logits]).mean()),
        # before the heads learn from this batch: how far each head is from chance (AUC 0.5)
        **separability(real_logits, fake_logits),
    }


def discriminator_backward(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    fake: Tensor,
    update: Update,
    step: int,
    generator: torch.Generator | None = None,
    autocast: AbstractContextManager | None = None,
) -> dict[str, float]:
    """Step 8 on one (micro-)batch: the heads' gradient of the hinge loss (+ γ·R1 on lazy steps)
    accumulates into ``update``; θ, ψ and F get none. ``autocast`` wraps the forward passes only."""
    with autocast or nullcontext():
        loss, metrics = discriminator_loss(models, objective, batch, fake, step, generator)
    with record_function("add/discriminator"):
        (loss / update.micro_batches).backward(inputs=update.params)
    return metrics


def discriminator_step(
    models: ADDModels,
    objective: ADDObjective,
    batch: ADDBatch,
    fake: Tensor,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """8. Update the heads φ on the hinge loss, plus γ·R1 at each head's input on lazy steps."""
    update = Update(models.discriminator.trainable_parameters(), optimizer, objective.max_grad_norm)
    update.zero_grad()
    metrics = discriminator_backward(models, objective, batch, fake, update, step, generator)
    if not math.isfinite(metrics["loss/D"]):
        raise FloatingPointError(
            f"non-finite discriminator loss: real={metrics['loss/D_real']:.4g} fake={metrics['loss/D_fake']:.4g}"
        )
    with record_function("add/discriminator"):  # 8. the heads' update: clip, step
        metrics["grad_norm/discriminator"] = float(update.clip())
        update.step()
    return metrics
