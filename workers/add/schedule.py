"""The noise schedule: α_t, σ_t and the conversions between model outputs and x0.

The only place these formulas live. Every schedule is indexed by integer timesteps t ∈ 0..T−1
(the currency of the ADD step, the student's timesteps and t̂) and written

    x_t = α_t · x0 + σ_t · ε                                                   (ADD Eq. 1)

- ``NoiseSchedule``, a variance-preserving discrete diffusion (DDPM): α_t = sqrt(ᾱ_t),
  σ_t = sqrt(1 − ᾱ_t), ᾱ_t from a diffusers scheduler config, so every beta schedule diffusers knows works.
- ``FlowMatchSchedule``, rectified flow (SD3, FLUX, Sana): α_t = 1 − σ_t, with σ_t the shifted
  σ((t+1)/T) of diffusers' ``FlowMatchEulerDiscreteScheduler``, so t = T − 1 is σ = 1, pure noise by
  construction; the network predicts the velocity v = ε − x0 (prediction type ``flow``) and takes
  σ_t·T as its timestep (``model_timestep``).

``schedule_from_scheduler_config`` picks the one a scheduler config describes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import DDPMScheduler
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")  # of a DDPM schedule
FLOW_PREDICTION_TYPES: tuple[str, ...] = ("flow", "sample")  # of a flow-matching schedule
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
FLOW_PREDICTION_ALIASES = {"flow_prediction": "flow"}  # DPM-Solver++'s name for it (Sana's config)

# With zero terminal SNR ᾱ_T = 0 exactly, and an ε-prediction can no longer be turned into x0
# (division by α_T = 0). Like diffusers' Euler schedulers we set ᾱ_T = 2^-24: SNR 6e-8, so the
# last timestep is still pure noise to every practical digit, but the conversion stays finite.
TERMINAL_ALPHA_BAR = 2.0**-24


def check_prediction_type(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES) -> str:
    if prediction_type not in allowed:
        raise ValueError(f"unknown prediction type {prediction_type!r}: allowed are {', '.join(allowed)}")
    return prediction_type


def is_flow_config(config: dict) -> bool:
    """Whether a diffusers scheduler config describes a flow-matching schedule (by its class name as saved,
    or, for an in-memory config, by the field only flow-matching schedulers have)."""
    config = dict(config)
    if config.get("use_flow_sigmas"):  # Sana ships a DPM-Solver++ config on flow sigmas
        return True
    name = config.get("_class_name")
    return name in FLOW_SCHEDULERS if name else "use_dynamic_shifting" in config


def schedule_from_scheduler_config(
    config: dict,
    zero_terminal_snr: bool | None = None,
    prediction_type: str | None = None,
    image_seq_len: int | None = None,
) -> NoiseSchedule:
    """The schedule a diffusers scheduler config describes: ``FlowMatchSchedule`` for a flow-matching
    scheduler (``zero_terminal_snr`` does not apply: its last timestep is pure noise already;
    ``image_seq_len`` sets a dynamic shift), ``NoiseSchedule`` for every other one."""
    if is_flow_config(config):
        return FlowMatchSchedule.from_scheduler_config(config, prediction_type, image_seq_len)
    return NoiseSchedule.from_scheduler_config(config, zero_terminal_snr, prediction_type)


class NoiseSchedule:
    """α_t, σ_t of one model and the conversions of its output to an x0-estimate.

    A plain object, not a module: ᾱ_t stays float64 on the CPU whatever dtype or device the
    networks are cast to, and each lookup casts to the tensor it is used with.
    """

    is_flow = False

    def __init__(self, alpha_bar: Tensor, prediction_type: str):
        self.prediction_type = check_prediction_type(prediction_type)
        self.alpha_bar = alpha_bar.detach().to("cpu", torch.float64)
        self.alphas, self.sigmas = self.alpha_bar.sqrt(), (1 - self.alpha_bar).sqrt()

    @classmethod
    def from_scheduler_config(
        cls,
        config: dict,
        zero_terminal_snr: bool | None = None,
        prediction_type: str | None = None,
    ) -> NoiseSchedule:
        """Build from any diffusers scheduler config (``scheduler_config.json``).

        ``zero_terminal_snr`` rescales the betas (Lin et al. 2023) so the last timestep is pure
        noise; ``None`` keeps what the config says.
        """
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if zero_terminal_snr is not None:
            config["rescale_betas_zero_snr"] = zero_terminal_snr
        scheduler = DDPMScheduler.from_config(config)
        alpha_bar = scheduler.alphas_cumprod.clone()
        if scheduler.config.get("rescale_betas_zero_snr", False):
            alpha_bar[-1] = TERMINAL_ALPHA_BAR
        return cls(alpha_bar, prediction_type or scheduler.config.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.alpha_bar.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alpha_bar[-1] <= TERMINAL_ALPHA_BAR)

    def _at(self, values: Tensor, t: Tensor, like: Tensor) -> Tensor:
        t = torch.as_tensor(t).to("cpu").long().reshape(-1)
        out = values[t].to(like.dtype if like.is_floating_point() else torch.float32)
        return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)

    def alpha(self, t: Tensor, like: Tensor) -> Tensor:
        """α_t, shaped to broadcast against ``like``."""
        return self._at(self.alphas, t, like)

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """σ_t, shaped to broadcast against ``like``."""
        return self._at(self.sigmas, t, like)

    def model_timestep(self, t: Tensor) -> Tensor:
        """What the network's ``timestep`` argument takes at index t: the index itself."""
        return t

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = α_t·x0 + σ_t·ε."""
        return self.alpha(t, x0) * x0 + self.sigma(t, x0) * eps

    def to_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The x0-estimate behind a model output of this schedule's prediction type."""
        alpha_t, sigma_t = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - sigma_t * model_output) / alpha_t  # x0 = (x_t − σ_t ε̂)/α_t
        if self.prediction_type == "v_prediction":
            return alpha_t * x_t - sigma_t * model_output  # x0 = α_t x_t − σ_t v̂
        return model_output

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The model output of this prediction type that corresponds to an x0-estimate."""
        alpha_t, sigma_t = self.alpha(t, x_t), self.sigma(t, x_t)
        if self.prediction_type == "epsilon":
            return self.eps_from_x0(x0, x_t, t)
        if self.prediction_type == "v_prediction":
            return (alpha_t * x_t - x0) / sigma_t  # from x0 = α_t x_t − σ_t v
        return x0

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """ε̂ = (x_t − α_t x0)/σ_t."""
        return (x_t - self.alpha(t, x_t) * x0) / self.sigma(t, x_t)


def shifted_sigma(sigma: Tensor, shift: float) -> Tensor:
    """The timestep shift of SD3 and Sana, s·σ / (1 + (s − 1)·σ): more steps at high noise for s > 1.
    FLUX's dynamic shift, e^μ / (e^μ + 1/σ − 1), is the same map with s = e^μ."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def dynamic_shift(config: dict, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift e^μ, μ linear in the image's token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as ``FluxPipeline`` computes it."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(image_seq_len * slope + base_shift - slope * base_len)


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow: x_t = (1 − σ_t)·x0 + σ_t·ε, σ_t = shift((t+1)/T), velocity v = ε − x0.

    The integer grid is the training grid of diffusers' ``FlowMatchEulerDiscreteScheduler``
    (σ from 1/T to 1, shifted), so every index is a timestep its pipelines can visit; the network
    takes σ_t·T (``model_timestep``), as the pipelines pass it. A fractional index addresses the σ between
    grid points (``index_of``): the teacher's solvers visit the pipelines' own inference sigmas that way.
    """

    is_flow = True

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow"):
        if shift <= 0:
            raise ValueError(f"the timestep shift must be positive, got {shift}")
        self.prediction_type = check_prediction_type(prediction_type, FLOW_PREDICTION_TYPES)
        self.shift = float(shift)
        T = num_train_timesteps
        base = torch.arange(1, T + 1, dtype=torch.float64) / T
        self.sigmas = shifted_sigma(base, self.shift)
        self.alphas = 1 - self.sigmas
        self.alpha_bar = self.alphas.square()  # for code that reads SNRs: α_t²/σ_t²

    @classmethod
    def from_scheduler_config(
        cls, config: dict, prediction_type: str | None = None, image_seq_len: int | None = None
    ) -> FlowMatchSchedule:
        """From a ``FlowMatchEulerDiscreteScheduler`` config; a dynamic shift (FLUX) needs ``image_seq_len``.

        ``prediction_type`` (else the config's ``prediction_type``, the override ``load_teacher`` writes there)
        must be ``flow`` or ``sample``: a flow-matching network predicts neither ε nor DDPM's v."""
        config = dict(config)
        prediction_type = prediction_type or config.get("prediction_type") or "flow"
        prediction_type = FLOW_PREDICTION_ALIASES.get(prediction_type, prediction_type)
        if prediction_type not in FLOW_PREDICTION_TYPES:
            raise ValueError(
                f"prediction type {prediction_type!r} does not apply to a flow-matching schedule "
                f"({config.get('_class_name', 'flow sigmas')}): allowed are {', '.join(FLOW_PREDICTION_TYPES)}"
            )
        if config.get("use_dynamic_shifting"):
            if image_seq_len is None:
                raise ValueError("this flow-matching scheduler shifts by resolution: pass image_seq_len")
            shift = dynamic_shift(config, image_seq_len)
        else:
            shift = config.get("shift", config.get("flow_shift", 1.0))  # flow_shift: Sana's DPM-Solver++ config
        return cls(config.get("num_train_timesteps", 1000), shift, prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.shape[0]

    @property
    def zero_terminal_snr(self) -> bool:
        return True

    def sigma_at(self, t: Tensor) -> Tensor:
        """σ_t (float64, CPU, flat) at integer indices, or at fractional ones between grid points:
        σ is continuous in t, and the pipelines' inference sigmas (``index_of``) fall between them."""
        t = torch.as_tensor(t).to("cpu").reshape(-1)
        if t.is_floating_point():
            return shifted_sigma((t.double() + 1) / self.num_train_timesteps, self.shift)
        return self.sigmas[t]

    def index_of(self, sigma: Tensor) -> Tensor:
        """The (fractional, float64) index t with σ_t = ``sigma``: the inverse of the shift, times T, less 1."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (self.shift - (self.shift - 1) * sigma) * self.num_train_timesteps - 1

    def _shaped(self, values: Tensor, like: Tensor) -> Tensor:
        out = values.to(like.dtype if like.is_floating_point() else torch.float32)
        return out.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)

    def alpha(self, t: Tensor, like: Tensor) -> Tensor:
        """α_t = 1 − σ_t, shaped to broadcast against ``like``."""
        return self._shaped(1 - self.sigma_at(t), like)

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """σ_t, shaped to broadcast against ``like``."""
        return self._shaped(self.sigma_at(t), like)

    def model_timestep(self, t: Tensor) -> Tensor:
        """σ_t·T as float: the ``timestep`` the flow transformers take (FLUX divides it by T itself)."""
        t = torch.as_tensor(t)
        return (self.sigma_at(t) * self.num_train_timesteps).float().reshape(t.shape).to(t.device)

    def velocity_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """v = ε − x0 = (x_t − x0)/σ_t: what a flow solver steps with, whatever the network predicts."""
        return (x_t - x0) / self.sigma(t, x_t)

    def to_x0(self, model_output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "flow":
            return x_t - self.sigma(t, x_t) * model_output  # x0 = x_t − σ_t v̂
        return model_output

    def from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "flow":
            return self.velocity_from_x0(x0, x_t, t)
        return x0
