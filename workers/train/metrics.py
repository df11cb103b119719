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

# The per-micro-batch values every rank contributes each step, in a fixed order: the all-gather
# that averages them is also how all ranks learn together that one of them went non-finite.
DISCRIMINATOR_KEYS = ("loss/D", "loss/D_real", "loss/D_fake", "loss/R1", "logits/real", "logits/fake")
STEP_KEYS = ("loss/student", "loss/G_adv", "loss/distill", "logits/fake_G", *DISCRIMINATOR_KEYS)
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
        self.steps = 0
        self.samples = 0
        self.wait_s = 0.0
        self.busy_s = 0.0
        self.started = time.perf_counter()
        self.cpu_started = time.process_time()

    def add_step(self, values: dict[str, float], samples: int, wait_s: float, step_s: float) -> None:
        for k, v in values.items():
            self.sums[k] += v
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
        out = {k: v / n for k, v in self.sums.items()}
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
