"""θ, the student: a trainable copy of the teacher's denoiser, sampled at T_student."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from workers.add.conditioning import Conditioning
from workers.add.denoiser import Denoiser
from workers.add.families import family_of
from workers.add.families.unet import UNetFamily
from workers.add.schedule import NoiseSchedule, schedule_from_scheduler_config
from workers.add.teacher import Teacher

# Attention and feed-forward projections of diffusers UNets: where LoRA adapters go by default on a UNet.
DEFAULT_LORA_TARGETS = UNetFamily.lora_targets


def student_timesteps(n: int = 4, num_train_timesteps: int = 1000, spacing: str = "trailing") -> list[int]:
    """T_student = {τ1..τN}, largest first, always containing the last timestep (pure noise).

    ``trailing`` gives {999, 749, 499, 249} for N = 4 (ours; the paper gives only τ1 = 999).
    """
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"student steps N must be in 1..{num_train_timesteps}, got {n}")
    if spacing != "trailing":
        raise ValueError(f"unknown student timestep spacing {spacing!r}: allowed is 'trailing'")
    step = num_train_timesteps / n
    return [round(num_train_timesteps - 1 - i * step) for i in range(n)]


def check_student_timesteps(timesteps: list[int], num_train_timesteps: int) -> list[int]:
    """Validate explicit student timesteps: integers in range, distinct; returned largest first."""
    if not timesteps:
        raise ValueError("student timesteps must not be empty")
    bad = [t for t in timesteps if not isinstance(t, int) or not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(
            f"student timesteps {bad} out of range: each must be an integer in 0..{num_train_timesteps - 1}"
        )
    if len(set(timesteps)) != len(timesteps):
        raise ValueError(f"student timesteps {timesteps} contain duplicates")
    return sorted(timesteps, reverse=True)


class Student(nn.Module):
    """The student θ, initialised from the teacher's weights (random init collapses).

    Full fine-tuning by default; with ``lora_rank`` only peft LoRA adapters train, on ``lora_targets``
    (module-name suffixes; default: the family's attention projections). Its schedule is
    its own: the teacher's betas rescaled to zero terminal SNR, so τ1 = T − 1 starts from pure
    noise (a flow-matching teacher's schedule is pure noise there already). ``network`` replaces the
    copy of the teacher's network where the teacher has none to copy (the toy problem's closed-form
    teacher); ``prediction_type`` defaults to the teacher's.
    """

    def __init__(
        self,
        teacher: Teacher,
        timesteps: list[int] | None = None,
        zero_terminal_snr: bool = True,
        prediction_type: str | None = None,
        network: nn.Module | None = None,
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        lora_targets: tuple[str, ...] | None = None,
    ):
        super().__init__()
        schedule = schedule_from_scheduler_config(
            teacher.scheduler_config,
            zero_terminal_snr=zero_terminal_snr,
            prediction_type=prediction_type,
            image_seq_len=teacher.image_seq_len,
        )
        T = schedule.num_train_timesteps
        timesteps = student_timesteps(4, T) if timesteps is None else check_student_timesteps(list(timesteps), T)
        unet = copy.deepcopy(teacher.unet if network is None else network)
        unet.requires_grad_(True)
        self.lora_rank = lora_rank
        if lora_rank is not None:
            unet.requires_grad_(False)
            if lora_targets is None:
                family = family_of(unet)
                lora_targets = family.lora_targets if family is not None else DEFAULT_LORA_TARGETS
            unet.add_adapter(_lora_config(unet, lora_rank, lora_alpha or lora_rank, lora_targets))
        self.denoiser = Denoiser(unet, schedule)
        self.register_buffer("timesteps", torch.tensor(timesteps, dtype=torch.long), persistent=False)

    @property
    def schedule(self) -> NoiseSchedule:
        return self.denoiser.schedule

    @property
    def unet(self) -> nn.Module:
        return self.denoiser.unet

    def denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """x̂θ(x_t, t, c), an x0-estimate whatever the prediction type."""
        return self.denoiser(x_t, t, cond)

    forward = denoise

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """s ~ U(T_student), one per sample."""
        index = torch.randint(len(self.timesteps), (batch_size,), generator=generator, device="cpu")
        return self.timesteps.cpu()[index].to(self.timesteps.device)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


def _lora_config(unet: nn.Module, rank: int, alpha: float, targets: tuple[str, ...]):
    from peft import LoraConfig

    names = {name for name, _ in unet.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in {type(unet).__name__}")
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=present, init_lora_weights="gaussian")
