"""The conditioning every denoiser and the discriminator share: one batch of encoded prompts."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Encoded captions for one batch; every field is batch-first or ``None``.

    - ``prompt_embeds``: (B, L, D) token embeddings for cross- or joint attention (SD, SDXL; SD3's
      CLIP-L + CLIP-G + T5 sequence; FLUX's T5 tokens; Sana's Gemma tokens).
    - ``pooled``: (B, P) one vector per caption. The discriminator's projection conditioning
      uses it; SDXL also feeds it to the UNet as ``text_embeds``, SD3 and FLUX to the transformer as
      ``pooled_projections``.
    - ``time_ids``: (B, 6) SDXL micro-conditioning (original size, crop, target size).
    - ``class_labels``: (B,) integer labels or (B, E) embeddings for class-conditioned UNets.
    - ``prompt_mask``: (B, L) 1 for real tokens, 0 for padding (Sana masks its cross-attention).
    - ``guidance``: (B,) the guidance scale a guidance-distilled transformer (FLUX.1-dev) takes as an
      input embedding in place of classifier-free guidance.
    """

    prompt_embeds: Tensor | None = None
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    class_labels: Tensor | None = None
    prompt_mask: Tensor | None = None
    guidance: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def __len__(self) -> int:
        tensors = self._tensors()
        if not tensors:
            raise ValueError("empty Conditioning has no batch size")
        return next(iter(tensors.values())).shape[0]

    def map(self, fn) -> Conditioning:
        """Apply ``fn`` to every tensor field (index, move, detach...)."""
        return replace(self, **{k: fn(v) for k, v in self._tensors().items()})

    def to(self, device=None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move to ``device``; cast only floating tensors to ``dtype`` (labels stay integer)."""
        return self.map(lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None))

    def __getitem__(self, index) -> Conditioning:
        return self.map(lambda v: v[index])

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (e.g. conditional and unconditional for one CFG call)."""
        names = items[0]._tensors().keys()
        for c in items[1:]:
            if c._tensors().keys() != names:
                raise ValueError("cannot concatenate Conditionings with different fields")
        return Conditioning(**{k: torch.cat([getattr(c, k) for c in items]) for k in names})
