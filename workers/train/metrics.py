"""What the loop reports every ``train.log_every`` steps: losses, grad norms, learning rates,
throughput, the fraction of step time spent waiting for data, and memory.

Losses are means over the interval's steps and over ranks (each rank's loss is already a mean over
its micro-batch), so they equal a one-worker run's at the same global batch. Grad norms are the
global norms before clipping. ``time/data_wait_fraction`` is the time blocked on the data
iterator over the step time, averaged over ranks (``_max``: the slowest rank).
``memory/student_state_bytes_*``: θ's parameters plus its AdamW state held by each rank (its shards).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import psutil
import torch

from workers.add.balance import hinge_chance

# The per-micro-batch values every rank contributes each step, in a fixed order: the all-gather
# that averages them is also how all ranks learn together that one of them went non-finite.
DISCRIMINATOR_KEYS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/R1", "logits/real", "logits/fake")
BALANCE_KEYS = (
    "balance/lambda_adv",
    "balance/grad_adv_x",
    "balance/grad_distill_x",
    "balance/ratio_x",
    "balance/cos_x",
)
STEP_KEYS = ("loss/student", "loss/G_adv", "loss/distill", "logits/fake_G", *DISCRIMINATOR_KEYS, *BALANCE_KEYS)
# θ's gradient split into its two terms: on the step before each report only (one more backward)
THETA_KEYS = ("balance/grad_adv_theta", "balance/grad_distill_theta", "balance/ratio_theta", "balance/cos_theta")
# An extra heads' update (train.discriminator_steps > 1) contributes DISCRIMINATOR_KEYS only, to
# the finiteness check; the reported D losses are the joint update's.


def non_finite(values: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in values.items() if not math.isfinite(v)}


class IntervalMetrics:
    """Accumulates per-step values between two reports."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # a key missing from some steps is averaged over its own
        self.steps = 0
        self.samples = 0
        self.wait_s = 0.0
        self.busy_s = 0.0
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def add_step(self, values: dict[str, float], samples: int, wait_s: float, step_s: float) -> None:
        for k, v in values.items():
            self.sums[k] += v
            self.counts[k] += 1
        self.steps += 1
        self.samples += samples
        self.wait_s += wait_s
        self.busy_s += step_s

    def local_timing(self) -> list[float]:
        """This rank's [data wait, step time, RSS bytes, CUDA peak bytes, CPU utilisation], to be gathered."""
        cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        elapsed = time.perf_counter() - self.started
        cpu = (time.process_time() - self.cpu_started) / elapsed if elapsed > 0 else 0.0
        return [self.wait_s, self.busy_s, float(psutil.Process().memory_info().rss), float(cuda_peak), cpu]

    def summary(self, per_rank_timing: list[list[float]]) -> dict[str, float]:
        """Interval means, throughput and timing from every rank's ``local_timing()``."""
        elapsed = time.perf_counter() - self.started
        n = max(self.steps, 1)
        out = {k: v / self.counts[k] for k, v in self.sums.items()}
        fractions = [wait / busy if busy > 0 else 0.0 for wait, busy, *_ in per_rank_timing]
        out |= {
            "throughput/samples_per_s": self.samples / elapsed if elapsed > 0 else 0.0,
            "time/step_s": elapsed / n,
            "time/data_wait_fraction": sum(fractions) / len(fractions),
            "time/data_wait_fraction_max": max(fractions),
            "memory/rss_bytes_max": max(t[2] for t in per_rank_timing),
            # process CPU time over wall time: below the torch thread count, a rank waited (on
            # collectives, data, or for a core other processes held)
            "time/cpu_utilization": sum(t[4] for t in per_rank_timing) / len(per_rank_timing),
        }
        if torch.cuda.is_available():
            out["memory/cuda_peak_bytes_max"] = max(t[3] for t in per_rank_timing)
        return out


class HeadsMonitor:
    """Says, loudly, when the discriminator heads sit at chance: L_D within ``margin`` of its value with
    every logit at 0 (2 per head) and a mean real/fake AUC under ``max_auc``, for ``patience`` reports
    in a row. Then L_G's gradient comes from heads that know nothing (ADD_METHOD.md: "a hinge loss at
    its chance value for long is a bug signal, not an equilibrium")."""

    def __init__(self, num_heads: int, patience: int = 5, margin: float = 0.05, max_auc: float = 0.6):
        self.chance = hinge_chance(num_heads)
        self.patience, self.margin, self.max_auc = patience, margin, max_auc
        self.run = 0  # reports in a row at chance
        self.warnings: list[str] = []

    def at_chance(self, metrics: dict) -> bool:
        loss_d, auc = metrics.get("loss/D"), metrics.get("heads/auc_mean")
        if loss_d is None or auc is None:
            return False
        return loss_d >= (1 - self.margin) * self.chance and auc <= self.max_auc

    def update(self, step: int, metrics: dict) -> str | None:
        """The warning to show after this report, if any (once per ``patience`` reports at chance)."""
        self.run = self.run + 1 if self.at_chance(metrics) else 0
        metrics["heads/chance_loss_D"] = self.chance
        metrics["heads/reports_at_chance"] = self.run
        if self.run == 0 or self.run % self.patience:
            return None
        message = (
            f"the discriminator heads are at chance at step {step}: L_D {metrics['loss/D']:.2f} of "
            f"{self.chance:.0f} (all logits 0), mean real/fake AUC {metrics['heads/auc_mean']:.2f}, for the last "
            f"{self.run} reports. L_G pushes the student along heads that know nothing; look at "
            f"balance/ratio_theta (‖∇θ L_G‖ / ‖∇θ λ·L_distill‖) and try loss.balance: adaptive with a smaller "
            f"loss.adv_ratio"
        )
        self.warnings.append(message)
        return message


def balance_summary(metrics: dict) -> str | None:
    """One line for the console: how the two losses pull on θ and whether the heads know anything."""
    needed = ("balance/ratio_theta", "balance/cos_theta", "loss/D", "heads/chance_loss_D", "heads/auc_mean")
    if not all(k in metrics for k in needed):
        return None
    return (
        f"step {metrics.get('step')}: ‖∇θ L_G‖/‖∇θ λ·L_distill‖ {metrics['balance/ratio_theta']:.2f} "
        f"(cos {metrics['balance/cos_theta']:+.2f}, λ_adv {metrics.get('balance/lambda_adv', float('nan')):.3g}); "
        f"heads L_D {metrics['loss/D']:.2f} of {metrics['heads/chance_loss_D']:.0f} at chance, "
        f"real/fake AUC {metrics['heads/auc_mean']:.2f}"
    )
