"""An exponential moving average of the student's trainable parameters.

    θ_ema ← decay·θ_ema + (1 − decay)·θ          after every optimizer step

The shadows have the type and placement of the parameters they follow: under FSDP they are
DTensors with the same sharding, so each rank keeps 1/world of them, updates them locally with no
communication, and ``torch.distributed.checkpoint`` saves and reshards them like the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """Shadows of ``module``'s trainable parameters, keyed by their names."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One EMA step towards the module's current parameters."""
        for name, p in module.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows themselves (loading into them in place restores the EMA)."""
        return self.shadow
