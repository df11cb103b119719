"""Frozen parts stay frozen: enforced by the class, not by the caller."""

from __future__ import annotations

from torch import nn


class FrozenModule(nn.Module):
    """A module whose parameters never train and which never leaves eval mode.

    Subclasses call :meth:`freeze` at the end of ``__init__`` (after their submodules exist);
    ``train()`` is overridden so that ``model.train()`` on a parent cannot switch dropout or batch
    norm of a frozen network back on (StyleGAN-T ``networks/discriminator.py`` does the same).
    """

    def freeze(self) -> FrozenModule:
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:  # noqa: ARG002 - frozen: always eval
        return super().train(False)
