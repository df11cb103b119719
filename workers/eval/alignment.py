"""Prompt-alignment scorers: how well each image matches the prompt it was generated from.

Any callable ``(images: (N, C, H, W) in [0, 1], prompts: list of N) -> (N,) scores`` will do; the
evaluator reports the mean. CLIP score for SD-class jobs; for Fashion-MNIST, a classifier's
accuracy on the class the prompt names (1.0 or 0.0 per image).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.eval.features import as_rgb


@runtime_checkable
class PromptScorer(Protocol):
    """``scores = scorer(images, prompts)``: one score per image, higher is better aligned."""

    def __call__(self, images: Tensor, prompts: list) -> Tensor: ...


class CLIPScorer:
    """CLIP score: 100 · max(cos(image embedding, text embedding), 0) (Hessel et al. 2021, with w = 100 as
    torchmetrics' ``CLIPScore``), from a transformers ``CLIPModel`` folder or hub id in the local cache."""

    def __init__(self, model: str = "openai/clip-vit-base-patch32", device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(model).to(device).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(model)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list) -> Tensor:
        pixels = (as_rgb(images).clamp(0, 1) * 255).round().to(torch.uint8)
        inputs = self.processor(
            text=[str(p) for p in prompts], images=list(pixels), return_tensors="pt", padding=True, truncation=True
        ).to(self.device)
        img = F.normalize(self.model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(
            self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), dim=-1
        )
        return (100 * (img * txt).sum(-1)).clamp(min=0).float().cpu()
