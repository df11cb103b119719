"""A problem with a known answer: ADD on a 2-D Gaussian mixture.

The teacher ψ is the mixture's exact denoiser E[x0 | x_t] (closed form), so any error in the
student is the method's, not the teacher's. Its one-step sample from pure noise is the mixture's
mean, far from the data; a faithful ADD student learns to land on the modes in one step.
The same holds on either path: a DDPM schedule, or rectified flow (α_t = 1 − σ_t, the teacher's exact
velocity v = (x_t − E[x0 | x_t])/σ_t), ``run_toy(schedule="flow")``.
Run ``addctl toy`` (``--schedule flow``) for the table and a scatter plot.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.frozen import FrozenModule
from workers.add.losses import DistillationLoss, R1Penalty
from workers.add.sampler import sample_student, sample_teacher, teacher_solvers
from workers.add.schedule import NoiseSchedule, schedule_from_scheduler_config
from workers.add.step import ADDBatch, ADDModels, ADDObjective, discriminator_step, student_step
from workers.add.student import Student
from workers.add.teacher import Teacher

TOY_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "prediction_type": "sample",
}
# rectified flow, unshifted: the shift of the image teachers (SD3's 3.0) moves the grid to high noise for
# many tokens; on these 2-D points ADD then fails on 2 of 6 seeds (``run_toy(flow_shift=3.0)``), at 1.0 on none
TOY_FLOW_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}
TOY_SCHEDULERS = {"ddpm": TOY_SCHEDULER, "flow": TOY_FLOW_SCHEDULER}
SOLVER_TITLES = {"ddim": "DDIM", "euler": "Euler"}


class GaussianMixture:
    """K isotropic Gaussians with equal weights on a circle."""

    def __init__(self, modes: int = 8, radius: float = 1.0, std: float = 0.05):
        angles = torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
        self.means = radius * torch.stack([angles.cos(), angles.sin()], 1)
        self.std = std

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator)
        return (self.means[k] + self.std * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


class ExactDenoiser(nn.Module):
    """E[x0 | x_t] of the mixture under x_t = α_t x0 + σ_t ε, returned as the schedule's prediction type
    (x0 for ``sample``, the exact velocity (x_t − x0)/σ_t for ``flow``).

    Given component k: x_t ~ N(α μ_k, (α²s² + σ²) I) and
    E[x0 | x_t, k] = μ_k + α s² (x_t − α μ_k)/(α²s² + σ²); the posterior over k weights these.
    Any path with α_t, σ_t works: for rectified flow α_t = 1 − σ_t.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        x = x_t.double()
        alpha, sigma = self.schedule.alpha(t, x), self.schedule.sigma(t, x)  # (B, 1)
        mu, s2 = self.mixture.means.to(x.device), self.mixture.std**2
        var = alpha**2 * s2 + sigma**2  # (B, 1)
        diff = x[:, None, :] - alpha[:, None] * mu[None]  # (B, K, 2)
        log_w = -diff.square().sum(-1) / (2 * var)  # equal weights and variances: normalise only
        w = log_w.softmax(1)[..., None]
        x0_k = mu[None] + (alpha * s2 / var)[:, None] * diff
        x0 = (w * x0_k).sum(1)
        return self.schedule.from_x0(x0, x, t).to(x_t.dtype)


class MLPDenoiser(nn.Module):
    """A small MLP network ``(x_t, t, cond) -> output`` for 2-D points."""

    def __init__(self, width: int = 128, t_dim: int = 32):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(
            nn.Linear(2 + t_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, 2),
        )

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        emb = get_timestep_embedding(t.float(), self.t_dim).to(x_t)
        return self.net(torch.cat([x_t, emb], 1))


class RandomFourierFeatures(FrozenModule):
    """F for points: frozen random Fourier features at several scales (one tap per scale)."""

    input_space = "model"

    def __init__(self, scales: tuple[float, ...] = (1.0, 4.0), dim: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.stack([s * torch.randn(2, dim // 2, generator=g) for s in scales]))
        self.channels = [dim] * len(scales)
        self.freeze()

    def forward(self, x: Tensor) -> list[Tensor]:
        proj = torch.einsum("bi,kij->kbj", x, self.B.to(x))
        return list(torch.cat([proj.sin(), proj.cos()], -1).unbind(0))


class ToyDiscriminator(nn.Module):
    """D = frozen F plus one small MLP head per tap; unconditional (the mixture has no captions)."""

    mix_real_fake = False  # no batch norm in its heads

    def __init__(self, width: int = 128):
        super().__init__()
        self.feature_network = RandomFourierFeatures()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, width), nn.LeakyReLU(0.2), nn.Linear(width, 1))
            for c in self.feature_network.channels
        )

    @property
    def input_space(self) -> str:
        return self.feature_network.input_space

    def features(self, x, cond, x_real=None, generator=None) -> tuple[list[Tensor], None]:
        return self.feature_network(x), None

    def head_logits(self, feats: list[Tensor], c) -> list[Tensor]:
        return [head(f) for head, f in zip(self.heads, feats, strict=True)]

    def paired_logits(self, feats_real, feats_fake, c_real, c_fake) -> tuple[list[Tensor], list[Tensor]]:
        return self.head_logits(feats_real, c_real), self.head_logits(feats_fake, c_fake)

    def forward(self, x, cond, x_real=None, generator=None) -> list[Tensor]:
        return self.head_logits(*self.features(x, cond, x_real, generator))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-1 distance between two equal-size point sets."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0).values, (b.double() @ dirs).sort(0).values
    return float((pa - pb).abs().mean())


def pretrain(net: nn.Module, mixture: GaussianMixture, schedule: NoiseSchedule, steps: int, seed: int) -> nn.Module:
    """Ordinary diffusion training, the MSE to the schedule's target (x0; v = ε − x0 for flow, flow matching):
    the "pretrained model" the student starts from."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        x0 = mixture.sample(256, g)
        t = torch.randint(schedule.num_train_timesteps, (256,), generator=g)
        x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        loss = (net(x_t, t, Conditioning()) - schedule.from_x0(x0, x_t, t)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def run_toy(
    steps: int = 600,
    batch_size: int = 256,
    seed: int = 0,
    n_eval: int = 2000,
    objective: ADDObjective | None = None,
    lr_student: float = 5e-4,
    lr_heads: float = 2e-3,
    schedule: str = "ddpm",
    flow_shift: float | None = None,
) -> dict:
    """Distil the exact teacher into an MLP student with ADD; sliced W1 to the data per sampler.

    ``schedule``: the teacher's path, ``ddpm`` (compared with its DDIM sampler) or ``flow`` (rectified flow,
    compared with its Euler sampler, the flow pipelines' own); ``flow_shift`` replaces the flow teacher's shift.
    """
    if schedule not in TOY_SCHEDULERS:
        raise ValueError(f"unknown toy schedule {schedule!r}: allowed are {', '.join(TOY_SCHEDULERS)}")
    if flow_shift is not None and schedule != "flow":
        raise ValueError("flow_shift is the flow teacher's timestep shift: it needs schedule='flow'")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mixture = GaussianMixture()
    config = TOY_SCHEDULERS[schedule] if flow_shift is None else {**TOY_FLOW_SCHEDULER, "shift": flow_shift}
    teacher_schedule = schedule_from_scheduler_config(config)
    teacher = Teacher(ExactDenoiser(mixture, teacher_schedule), config)
    net = pretrain(MLPDenoiser(), mixture, teacher_schedule, steps=600, seed=seed)
    student = Student(teacher, network=net)
    models = ADDModels(student, teacher, ToyDiscriminator())
    objective = objective or ADDObjective(
        distill=DistillationLoss("exponential"), r1=R1Penalty(gamma=0.1), guidance_scale=1.0
    )
    opt_g = torch.optim.Adam(student.trainable_parameters(), lr=lr_student, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(models.discriminator.trainable_parameters(), lr=lr_heads, betas=(0.0, 0.99))

    data = mixture.sample(n_eval, torch.Generator().manual_seed(seed + 1))
    shape = (n_eval, 2)

    def distance(samples: Tensor) -> float:
        return sliced_wasserstein(samples, data)

    results = {"student 1-step before ADD": distance(sample_student(student, None, shape, 1, _gen(seed)))}
    history = []
    for i in range(steps):
        batch = ADDBatch.from_pixels(teacher, mixture.sample(batch_size, g), Conditioning())
        metrics, fake = student_step(models, objective, batch, opt_g, g)
        metrics |= discriminator_step(models, objective, batch, fake, opt_d, i, g)
        history.append(metrics)
    results["student 1-step"] = distance(sample_student(student, None, shape, 1, _gen(seed)))
    results["student 4-step"] = distance(sample_student(student, None, shape, 4, _gen(seed)))
    solver = teacher_solvers(teacher)[0]
    for n in (1, 4, 50):
        results[f"teacher {SOLVER_TITLES[solver]} {n}-step"] = distance(
            sample_teacher(teacher, None, shape, n, _gen(seed), solver=solver)
        )
    results["data vs fresh data"] = distance(mixture.sample(n_eval, torch.Generator().manual_seed(seed + 2)))
    return {"sliced_w1": results, "history": history, "student": student, "teacher": teacher, "data": data}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + 10)


def plot(run: dict, path: Path, seed: int) -> None:
    """A scatter plot of the data, the teacher at 1 and 50 steps and the student at 1 step, at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = (1000, 2)
    panels = {
        "data": run["data"][:1000],
        "teacher, 1 step": sample_teacher(run["teacher"], None, shape, 1, _gen(seed)),
        "teacher, 50 steps": sample_teacher(run["teacher"], None, shape, 50, _gen(seed)),
        "ADD student, 1 step": sample_student(run["student"], None, shape, 1, _gen(seed)),
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True)
    for ax, (title, pts) in zip(axes, panels.items(), strict=True):
        ax.scatter(*pts.T.numpy(), s=2, alpha=0.5)
        ax.set_title(title)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
