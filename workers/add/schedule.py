"""The noise schedule: α_t, σ_t and the conversions between model outputs and x0.

The only place these formulas live. A variance-preserving discrete diffusion (DDPM):

    x_t = α_t · x0 + σ_t · ε,   α_t = sqrt(ᾱ_t),   σ_t = sqrt(1 − ᾱ_t)          (ADD Eq. 1)

with ᾱ_t taken from a diffusers scheduler config, so every beta schedule diffusers knows works.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import DDPMScheduler
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")

# With zero terminal SNR ᾱ_T = 0 exactly, and an ε-prediction can no longer be turned into x0
# (division by α_T = 0). Like diffusers' Euler schedulers we set ᾱ_T = 2^-24: SNR 6e-8, so the
# last timestep is still pure noise to every practical digit, but the conversion stays finite.
TERMINAL_ALPHA_BAR = 2.0**-24


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction type {prediction_type!r}: allowed are {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


class NoiseSchedule:
    """α_t, σ_t of one model and the conversions of its output to an x0-estimate.

    A plain object, not a module: ᾱ_t stays float64 on the CPU whatever dtype or device the
    networks are cast to, and each lookup casts to the tensor it is used with.
    """

    def __init__(self, alpha_bar: Tensor, prediction_type: str):
        self.prediction_type = check_prediction_type(prediction_type)
        self.alpha_bar = alpha_bar.detach().to("cpu", torch.float64)

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
        return self._at(self.alpha_bar.sqrt(), t, like)

    def sigma(self, t: Tensor, like: Tensor) -> Tensor:
        """σ_t, shaped to broadcast against ``like``."""
        return self._at((1 - self.alpha_bar).sqrt(), t, like)

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
