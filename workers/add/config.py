"""The job file's model sections: ``teacher``, ``student``, ``discriminator`` and ``loss``, read by
``workers.train.models`` to build the ADD models and objective (``workers/add``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from workers.config import ModelSource, Section


class TeacherSpec(Section):
    source: ModelSource = Field(description="diffusers folder (local path) or hub id of the teacher ψ")
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] | None = Field(
        None,
        description="override the scheduler's prediction type (a flow-matching teacher: flow or sample only)",
    )
    resolution: int | None = Field(
        None,
        ge=8,
        description="pixels the teacher runs at: SDXL's micro-conditioning, FLUX's resolution-dependent shift "
        "(default: the UNet's, the VAE's sample size); set it to data.resolution for FLUX",
    )
    guidance: float | None = Field(
        None,
        gt=0,
        description="the guidance scale a guidance-distilled teacher (FLUX.1-dev) takes as an input instead of "
        "CFG (default 3.5 for such a teacher; refused for a teacher without a guidance embedding)",
    )

    def load_kwargs(self) -> dict:
        """The keyword arguments of ``load_teacher`` this section sets (training and evaluation alike)."""
        return {"prediction_type": self.prediction_type, "resolution": self.resolution, "guidance": self.guidance}


class StudentSpec(Section):
    steps: int = Field(4, ge=1, le=1000, description="N, the number of student timesteps (trailing spacing)")
    timesteps: list[int] | None = Field(None, description="explicit T_student instead of `steps` (largest first)")
    zero_terminal_snr: bool = Field(True, description="rescale the betas so τ1 = T−1 is pure noise")
    lora_rank: int | None = Field(None, ge=1, description="train LoRA adapters of this rank instead of the full UNet")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank)")

    @field_validator("timesteps")
    @classmethod
    def _timesteps_in_range(cls, v):
        if v is not None and (not v or any(t < 0 or t > 999 for t in v) or v != sorted(set(v), reverse=True)):
            raise ValueError(f"must be distinct timesteps in [0, 999], largest first (got {v})")
        return v


class DiscriminatorSpec(Section):
    backbone: Literal["teacher", "dinov2"] = Field(
        "teacher", description="frozen F: the teacher (LADD) or DINOv2 (ADD)"
    )
    dinov2: ModelSource = Field("facebook/dinov2-small", description="DINOv2 path or hub id (backbone: dinov2)")
    taps: list[int] | list[str] | None = Field(None, description="tapped layers (default: spread evenly)")
    cmap_dim: int = Field(64, ge=1, description="dimension of the projection-conditioning map")
    image_conditioning: bool = Field(False, description="also condition on the real image's CLS embedding")
    augment_policy: str | None = Field(None, description="DiffAugment ops, e.g. 'color,translation,cutout'")
    resolution: int | None = Field(224, ge=14, description="DINOv2 input resolution")
    t_hat_loc: float = Field(
        0.0, description="teacher backbone: t̂/T = sigmoid(n), n ~ N(t_hat_loc, t_hat_scale²); lower judges finer detail"
    )
    t_hat_scale: float = Field(1.0, gt=0, description="teacher backbone: spread of the logit-normal t̂")
    text_rms: bool = Field(
        True, description="rescale the pooled text embedding to unit RMS before the heads' projection"
    )
    mix_real_fake: bool = Field(
        False, description="each batch-norm group of the heads holds real and fake samples (else one kind)"
    )
    minibatch_std: int = Field(
        0, ge=0, le=1024,
        description="heads see the features' std across groups of this many samples (StyleGAN; 0: off, else ≥ 2)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _minibatch_std_groups(self):
        if self.minibatch_std == 1:
            raise ValueError("minibatch_std: a group of one sample has no spread; use 0 (off) or at least 2")
        if self.minibatch_std and self.mix_real_fake:
            raise ValueError("minibatch_std needs groups of one kind (real or fake): set mix_real_fake false")
        return self


class LossSpec(Section):
    weighting: Literal["exponential", "sds", "nfsd"] = Field("exponential", description="distillation c(t)")
    lambda_distill: float = Field(
        2.5, ge=0, description="λ, weight of the distillation loss (c(t) × the mean squared error per element)"
    )
    balance: Literal["fixed", "adaptive"] = Field(
        "fixed",
        description="λ_adv, the weight of L_G: fixed (lambda_adv) or adaptive (set each step so the two gradients "
        "at x̂θ keep the ratio adv_ratio)",
    )
    lambda_adv: float = Field(1.0, ge=0, description="balance: fixed: weight of the adversarial loss L_G")
    adv_ratio: float = Field(
        1.0, gt=0, description="balance: adaptive: ‖λ_adv·∇L_G‖ / ‖∇λ·L_distill‖ at the student's output x̂θ"
    )
    guidance_scale: float = Field(3.0, ge=1, description="teacher CFG scale in the distillation target")
    gamma_r1: float = Field(1e-5, ge=0, description="γ, weight of R1 at the heads' inputs")
    r1_interval: int = Field(1, ge=1, description="apply R1 every this many D steps (lazy)")
    distill_space: Literal["pixel", "latent"] = Field("pixel", description="distance for latent teachers")
    sds_w: Literal["uniform", "snr"] = Field("uniform", description="w(t) of the sds/nfsd weightings")

    @model_validator(mode="after")
    def _some_loss(self):
        if self.lambda_distill == 0 and self.lambda_adv == 0 and self.balance == "fixed":
            raise ValueError("loss.lambda_adv: lambda_distill and lambda_adv are both 0: nothing to train")
        if self.balance == "adaptive" and self.lambda_distill == 0:
            raise ValueError(
                "loss.balance: adaptive sets λ_adv relative to the distillation gradient, but lambda_distill is 0 "
                "(for adversarial-only training use balance: fixed)"
            )
        return self
