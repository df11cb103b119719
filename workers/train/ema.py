"""An exponential moving average of the student's trainable parameters.

    θ_ema ← decay·θ_ema + (1 − decay)·θ          after every optimizer step

The shadows have the type and placement of the parameters they follow: under FSDP they are
DTensors with the same sharding, so each rank keeps 1/world of them, updates them locally with no
communication, and ``torch.distributed.checkpoint`` saves and reshards them like the parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[nn.Module]:
        """``module`` holds the EMA weights inside the block and its own weights again after it (what
        the samples during training show: the weights the export will hold)."""
        params = {name: p for name, p in module.named_parameters() if name in self.shadow}
        with torch.no_grad():
            own = {name: p.detach().clone() for name, p in params.items()}
            for name, p in params.items():
                p.copy_(self.shadow[name])
        try:
            yield module
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(own[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The shadows themselves (loading into them in place restores the EMA)."""
        return self.shadow
