"""D: the frozen feature network F with one trainable head D_φ,k per tapped layer k.

    D(x, c) = [D_φ,k(F_k(aug(x)), c)]_k,   c = [text pooled ; image embedding of x0 ; F's extra]

The training step calls ``features`` and ``head_logits`` separately where it needs to: R1 is
taken at each head's input (ADD_METHOD.md, step 8), so the step computes the real features
without grad, detaches them, and differentiates the heads alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workers.add.augment import DEFAULT_POLICY, DiffAugment
from workers.add.conditioning import Conditioning
from workers.add.features import DINOV2_RESOLUTION, DinoV2Features, FeatureNetwork, TeacherFeatures
from workers.add.heads import DiscriminatorHead
from workers.add.teacher import Teacher

BACKBONES = ("dinov2", "teacher")
# DINOv2 ViT-S/14, the paper's best feature network.
DEFAULT_DINOV2 = "facebook/dinov2-small"
# Colour, translation and cutout are for images; the teacher backbone sees latents (ours: off).
DEFAULT_AUGMENT_POLICY = {"dinov2": DEFAULT_POLICY, "teacher": ""}


class Discriminator(nn.Module):
    """Projected discriminator: frozen F, trainable heads conditioned by projection.

    ``cond_dim`` is the width of ``Conditioning.pooled`` (0: the heads ignore the text). With
    ``image_conditioning`` the condition also holds F's image embedding of the real x0 (ADD's best
    setting, text + image); F must then have ``image_embedding``. With ``text_rms`` the pooled text
    is rescaled to unit RMS per sample (ours): a unit-norm sentence embedding has components of
    about 1/√dim, which started every projection logit near zero and slowed the heads' learning
    (docs/benchmark.md, the Fashion-MNIST results); rescaled, the text weighs like F's extra condition.
    """

    def __init__(
        self,
        feature_network: FeatureNetwork,
        cond_dim: int,
        cmap_dim: int = 64,
        image_conditioning: bool = False,
        augment: DiffAugment | None = None,
        virtual_bs: int = 8,
        kernel_size: int | None = None,
        text_rms: bool = True,
        mix_real_fake: bool = False,
        minibatch_std: int = 0,
    ):
        super().__init__()
        if mix_real_fake and minibatch_std:
            raise ValueError("minibatch_std needs groups of one kind: it cannot be combined with mix_real_fake")
        if image_conditioning and not hasattr(feature_network, "image_embedding"):
            raise ValueError(
                f"{type(feature_network).__name__} has no image embedding: set image_conditioning off"
            )
        self.feature_network = feature_network
        self.augment = augment if augment is not None else DiffAugment("")
        self.cond_dim = cond_dim
        self.image_conditioning = image_conditioning
        self.text_rms = text_rms
        self.mix_real_fake = mix_real_fake
        image_dim = feature_network.embedding_dim if image_conditioning else 0
        self.c_dim = cond_dim + image_dim + feature_network.cond_dim_extra
        self.heads = nn.ModuleList(
            DiscriminatorHead(
                channels,
                self.c_dim,
                cmap_dim=cmap_dim,
                spatial_dims=feature_network.spatial_dims,
                kernel_size=kernel_size,
                virtual_bs=virtual_bs,
                minibatch_std=minibatch_std,
            )
            for channels in feature_network.channels
        )

    @property
    def input_space(self) -> str:
        """What D takes: "pixel" (decoded images in [-1, 1]) or "model" (the teacher's input)."""
        return self.feature_network.input_space

    def trainable_parameters(self) -> list[nn.Parameter]:
        """φ: the heads and their condition mappings; F never trains."""
        return list(self.heads.parameters())

    def condition(self, cond: Conditioning, x_real: Tensor | None, c_extra: Tensor | None) -> Tensor | None:
        """c = [pooled text ; image embedding of x_real ; F's extra condition], or None if empty."""
        parts = []
        if self.cond_dim > 0:
            if cond.pooled is None or cond.pooled.shape[-1] != self.cond_dim:
                got = None if cond.pooled is None else tuple(cond.pooled.shape)
                raise ValueError(
                    f"discriminator expects Conditioning.pooled of width {self.cond_dim}, got {got}"
                )
            text = cond.pooled.float()
            if self.text_rms:  # an all-zero (null) embedding stays zero
                text = text * torch.rsqrt(text.square().mean(dim=1, keepdim=True).clamp(min=1e-12))
            parts.append(text)
        if self.image_conditioning:
            if x_real is None:
                raise ValueError("image conditioning needs x_real, the real x0 the caption belongs to")
            with torch.no_grad():  # a condition, not a path for gradients
                parts.append(self.feature_network.image_embedding(x_real).float())
        if c_extra is not None:
            parts.append(c_extra.float())
        return torch.cat(parts, dim=1) if parts else None

    def features(
        self,
        x: Tensor,
        cond: Conditioning,
        x_real: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[list[Tensor], Tensor | None]:
        """F_k(aug(x)) for every head k, and the condition vector c."""
        feats, c_extra = self.feature_network(self.augment(x, generator), cond, generator)
        return feats, self.condition(cond, x_real, c_extra)

    def head_logits(self, feats: list[Tensor], c: Tensor | None) -> list[Tensor]:
        """D_φ,k(F_k, c): per-head logits (B, N_k)."""
        if len(feats) != len(self.heads):
            raise ValueError(f"got {len(feats)} feature maps for {len(self.heads)} heads")
        return [head(f, c) for head, f in zip(self.heads, feats, strict=True)]

    def paired_logits(
        self, feats_real: list[Tensor], feats_fake: list[Tensor], c_real: Tensor | None, c_fake: Tensor | None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The heads' logits on real and fake features. With ``mix_real_fake`` (ours) the two batches are
        interleaved, so each of the heads' batch-norm groups holds real and fake samples alike; otherwise
        each group holds one kind, as two separate calls give."""
        if not self.mix_real_fake:
            return self.head_logits(feats_real, c_real), self.head_logits(feats_fake, c_fake)
        both = [torch.stack([r, f], 1).flatten(0, 1) for r, f in zip(feats_real, feats_fake, strict=True)]
        c = None if c_real is None else torch.stack([c_real, c_fake], 1).flatten(0, 1)
        logits = self.head_logits(both, c)
        return [x[0::2] for x in logits], [x[1::2] for x in logits]

    def forward(
        self,
        x: Tensor,
        cond: Conditioning,
        x_real: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """Per-head logits of x: ``head_logits(*features(...))``."""
        return self.head_logits(*self.features(x, cond, x_real, generator))


def build_discriminator(
    backbone: str,
    *,
    cond_dim: int,
    teacher: Teacher | None = None,
    dinov2: nn.Module | str | None = None,
    taps: list[int] | list[str] | None = None,
    cmap_dim: int = 64,
    image_conditioning: bool = False,
    augment_policy: str | None = None,
    resolution: int | None = DINOV2_RESOLUTION,
    t_hat_loc: float = 0.0,
    t_hat_scale: float = 1.0,
    virtual_bs: int = 8,
    text_rms: bool = True,
    mix_real_fake: bool = False,
    minibatch_std: int = 0,
) -> Discriminator:
    """D on the named backbone: "dinov2" (pixels, ADD) or "teacher" (the teacher's input space, LADD).

    ``augment_policy`` None takes the backbone's default (colour, translation, cutout for DINOv2;
    none for the teacher); "" turns augmentation off. ``dinov2`` is a built ``Dinov2Model`` or a
    path or hub id (default ViT-S/14); ``resolution`` applies to DINOv2, ``t_hat_*`` to the teacher.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown discriminator backbone {backbone!r}: allowed are {', '.join(BACKBONES)}")
    if backbone == "dinov2":
        feature_network = DinoV2Features(dinov2 or DEFAULT_DINOV2, taps=taps, resolution=resolution)
    else:
        if teacher is None:
            raise ValueError("the teacher backbone needs the teacher: pass teacher=")
        feature_network = TeacherFeatures(teacher, taps=taps, t_hat_loc=t_hat_loc, t_hat_scale=t_hat_scale)
    policy = DEFAULT_AUGMENT_POLICY[backbone] if augment_policy is None else augment_policy
    return Discriminator(
        feature_network,
        cond_dim=cond_dim,
        cmap_dim=cmap_dim,
        image_conditioning=image_conditioning,
        augment=DiffAugment(policy),
        virtual_bs=virtual_bs,
        text_rms=text_rms,
        mix_real_fake=mix_real_fake,
        minibatch_std=minibatch_std,
    )
