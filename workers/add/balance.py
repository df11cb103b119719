"""The balance between the two halves of ADD, and how to see it.

Both losses reach θ only through the student's x0-estimate x̂θ, so the step takes the gradient of each
term *at x̂θ* (cheap: no pass through θ) and starts θ's backward from their weighted sum:

    g_adv = ∂L_G/∂x̂θ,   g_distill = ∂(λ·L_distill)/∂x̂θ,   ∇θ = (∂x̂θ/∂θ)ᵀ (λ_adv·g_adv + g_distill)

``Balance`` chooses λ_adv (ours; ADD_METHOD.md, "Scale and balance of the two losses"):
  - ``fixed``: λ_adv = ``lambda_adv``, as the paper writes it;
  - ``adaptive``: λ_adv = ρ·‖g_distill‖/‖g_adv‖ every step (VQGAN's adaptive weight, taken at the
    student's output rather than its last layer), so ‖λ_adv·g_adv‖ = ρ·‖g_distill‖ whatever the
    resolution, the number of heads or the scale of the heads' logits.

Normalisation (one choice, documented in docs/method-choices.md): L_distill is c(t) times the *mean* squared error
per element and L_G the sum over heads of each head's mean over its positions; both gradients at x̂θ
then shrink alike as the image grows, so λ and ρ mean the same at 32 px and at 128 px.

What a run logs to show the balance: the gradient norms of both terms and their cosine at x̂θ (every
step) and at θ (on log steps: ``split_backward``), and per head the mean logit on real and fake
samples and their separability (AUC) on the step's fresh batch, before the heads learn from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

BALANCES = ("fixed", "adaptive")
MAX_LAMBDA_ADV = 1e4  # VQGAN's clamp: a vanishing g_adv must not blow λ_adv up
EPS = 1e-12


@dataclass
class Balance:
    """How λ_adv, the weight of L_G, is set each step."""

    mode: str = "fixed"
    lambda_adv: float = 1.0  # fixed: the weight of L_G (the paper: 1)
    ratio: float = 1.0  # adaptive: ρ = ‖λ_adv·∇L_G‖ / ‖∇λ·L_distill‖ at x̂θ

    def __post_init__(self):
        if self.mode not in BALANCES:
            raise ValueError(f"unknown balance {self.mode!r}: allowed are {', '.join(BALANCES)}")
        if self.mode == "adaptive" and not self.ratio > 0:
            raise ValueError(f"the adaptive balance needs a ratio > 0, got {self.ratio}")

    @property
    def needs_adv_gradient(self) -> bool:
        """False for the distillation-only ablation (fixed λ_adv = 0): L_G's backward is skipped."""
        return self.mode == "adaptive" or self.lambda_adv != 0

    def weight(self, g_adv_norm: Tensor, g_distill_norm: Tensor) -> Tensor:
        """λ_adv for this step (a detached scalar tensor)."""
        if self.mode == "fixed":
            return torch.tensor(self.lambda_adv, device=g_adv_norm.device)
        return (self.ratio * g_distill_norm / (g_adv_norm + EPS)).clamp(max=MAX_LAMBDA_ADV).detach()


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a.float() * b.float()).sum()


def output_balance(g_adv: Tensor, g_distill: Tensor, lambda_adv: Tensor) -> dict[str, float]:
    """‖λ_adv·g_adv‖, ‖g_distill‖, their ratio and cosine at x̂θ (the whole batch's gradients)."""
    n_adv, n_distill = g_adv.float().norm() * lambda_adv, g_distill.float().norm()
    cos = _dot(g_adv, g_distill) / (g_adv.float().norm() * n_distill + EPS)
    return {
        "balance/lambda_adv": float(lambda_adv),
        "balance/grad_adv_x": float(n_adv),
        "balance/grad_distill_x": float(n_distill),
        "balance/ratio_x": float(n_adv / (n_distill + EPS)),
        "balance/cos_x": float(cos),
    }


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _global_sums(values: list[Tensor], sharded: bool) -> list[float]:
    """Sums over this rank's shards, added over ranks when the parameters are FSDP-sharded."""
    local = torch.stack([v.float() for v in values])
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(local)
    return local.tolist()


def split_backward(
    x_hat_theta: Tensor, g_adv: Tensor, g_distill: Tensor, params: list[torch.nn.Parameter]
) -> dict[str, float]:
    """θ's backward from x̂θ as two passes, L_G's then λ·L_distill's, adding up to the one-pass gradient;
    returns ‖∇θ λ_adv·L_G‖, ‖∇θ λ·L_distill‖, their ratio and cosine.

    ``params`` must hold no gradient yet (the first micro-batch of a step); the norms are global
    under FSDP (the gradients are reduce-scattered in each pass) and this rank's for a replica.
    """
    if any(p.grad is not None for p in params):
        raise RuntimeError("split_backward needs θ's gradients cleared: call it on a step's first micro-batch")
    # x̂θ's graph reaches θ alone (no ``inputs=``: FSDP2 accumulates into its unsharded views)
    x_hat_theta.backward(g_adv, retain_graph=True)
    adv = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    x_hat_theta.backward(g_distill)
    sq_adv, sq_distill, dot = [], [], []
    for p, a in zip(params, adv, strict=True):
        if p.grad is None:
            continue
        total, a = _local(p.grad.detach()), _local(a) if a is not None else torch.zeros_like(_local(p.grad))
        d = total - a
        sq_adv.append(_dot(a, a))
        sq_distill.append(_dot(d, d))
        dot.append(_dot(a, d))
    sharded = any(isinstance(p, DTensor) for p in params)
    if not sq_adv:
        return {}
    sums = [torch.stack(sq_adv).sum(), torch.stack(sq_distill).sum(), torch.stack(dot).sum()]
    sq_a, sq_d, ad = _global_sums(sums, sharded)
    n_a, n_d = math.sqrt(sq_a), math.sqrt(sq_d)
    return {
        "balance/grad_adv_theta": n_a,
        "balance/grad_distill_theta": n_d,
        "balance/ratio_theta": n_a / (n_d + EPS),
        "balance/cos_theta": ad / (n_a * n_d + EPS),
    }


def separability(real_logits: list[Tensor], fake_logits: list[Tensor]) -> dict[str, float]:
    """Per head k: the mean logit on real and fake samples and the AUC of telling them apart by each
    sample's mean logit, P(D_k(real) > D_k(fake)) with ties counted half; 0.5 is chance."""
    out = {}
    aucs = []
    for k, (r, f) in enumerate(zip(real_logits, fake_logits, strict=True)):
        r, f = r.detach().float().flatten(1).mean(1), f.detach().float().flatten(1).mean(1)
        diff = r[:, None] - f[None, :]
        auc = float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())
        aucs.append(auc)
        out[f"heads/{k}/logit_real"], out[f"heads/{k}/logit_fake"] = float(r.mean()), float(f.mean())
        out[f"heads/{k}/auc"] = auc
    out["heads/auc_mean"] = sum(aucs) / len(aucs)
    return out


def head_keys(num_heads: int) -> tuple[str, ...]:
    """The per-head metric names ``separability`` returns, in order."""
    per_head = [f"heads/{k}/{name}" for k in range(num_heads) for name in ("logit_real", "logit_fake", "auc")]
    return (*per_head, "heads/auc_mean")


def hinge_chance(num_heads: int) -> float:
    """L_D with every logit at 0: max(0, 1 − 0) + max(0, 1 + 0) per head."""
    return 2.0 * num_heads
