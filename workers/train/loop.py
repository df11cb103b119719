"""The Ray Train loop of an ADD job: ``train_loop_per_worker(config)`` runs on every training worker.

One optimizer step, on every rank in lockstep::

    train.discriminator_steps − 1 extra updates of the heads first (ours; 1 by default, the paper's):
        each on fresh micro-batches and fresh student samples sg(x̂θ), no gradient to θ
    for each of train.grad_accum micro-batches (rows from this rank's share of the Ray Data stream):
        student_backward(...)        steps 2–7, heads frozen; FSDP reduce-scatters θ's gradient
        discriminator_backward(...)  step 8, on the same micro-batch and its sg(x̂θ)
    all-reduce the heads' gradients (they are replicated), clip both (Update.clip: train.max_grad_norm)
    all-gather every rank's losses: the mean is what gets reported, and a non-finite value on any
        rank stops every rank here, before any optimizer step
    AdamW steps for θ and φ (Update.step), then the EMA of θ

The update itself is ``workers.add.step``'s, the one ``student_step`` / ``discriminator_step`` run:
this loop adds only what is distributed (accumulation, the all-reduce, finiteness across ranks).

Randomness is a pure function of (seed, step, micro-batch index in the global batch, update), where
the index of micro-batch i on rank r is r·grad_accum + i and the update is 0 for the joint one and
j for the j-th extra heads' update. So a run is reproducible bit for bit on
CPU, resumes exactly, and a one-worker run with grad_accum = W draws the same noise as W workers.

A non-finite loss does not raise out of the loop: Ray Train would count it as a worker failure
and retry it from the last checkpoint up to ``max_failures`` times (forever with -1), hitting the
same step again each time. Instead every rank reports a final ``status: non_finite`` with the
step and the values, writes no checkpoint, and returns; ``workers.train.trainer.run_training``
then raises ``NonFiniteLossError`` on the driver. The last good checkpoint stays the latest.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from workers.add.balance import head_keys
from workers.add.step import Update, discriminator_backward, student_backward, student_sample
from workers.data.transfer import download_folder, upload_folder
from workers.secrets import resolve_secrets
from workers.train.checkpoint import TrainState, apply_model_state, load_checkpoint, model_state, save_checkpoint
from workers.train.config import TrainJob
from workers.train.ema import EMA
from workers.train.export import consolidated_state, export_step, remove_export, write_export
from workers.train.fsdp import ReplicaSync, distributed, full_norm, local_fractions, shard_unet, state_bytes
from workers.train.metrics import (
    DISCRIMINATOR_KEYS,
    STEP_KEYS,
    THETA_KEYS,
    HeadsMonitor,
    IntervalMetrics,
    balance_summary,
    non_finite,
)
from workers.train.models import (
    build_models,
    build_objective,
    build_optimizers,
    export_copy,
    make_batch,
    set_hyperparameters,
    set_student_lr,
)
from workers.train.stream import BatchStream


class TrainCallback:
    """Hooks the loop calls on rank 0 (subclass; instances are pickled to the workers).

    ``on_start(info)``: after building and restoring (rank, world size, restored step, sharding).
    ``on_log(step, metrics)``: after each ``ray.train.report``, with the same metrics (global).
    ``on_samples(step, images)``: every ``train.sample_every`` steps, one-step samples of the student
    for ``train.sample_prompts`` (N, C, H, W) in [0, 1] (only when there are callbacks).
    ``on_end(summary)``: the loop's return value (status, step, export location, message).
    The orchestrator's MLflow logging is one of these.
    """

    def on_start(self, info: dict) -> None:
        pass

    def on_log(self, step: int, metrics: dict) -> None:
        pass

    def on_samples(self, step: int, images: torch.Tensor) -> None:
        pass

    def on_end(self, summary: dict) -> None:
        pass


@dataclass
class FaultInjection:
    """Testing hook: SIGKILL the worker of ``rank`` right after it completes ``after_step``,
    once: only while the file ``marker`` does not exist (it is created just before)."""

    rank: int
    after_step: int
    marker: str


@dataclass
class LoopOptions:
    """What the driver passes to the loop besides the TrainJob (it travels pickled)."""

    callbacks: list[TrainCallback] = field(default_factory=list)
    export_path: str | None = None  # consolidated student export: a path on export_filesystem
    export_filesystem: pafs.FileSystem | None = None
    export_uri: str | None = None  # the same location as shown to people (no credentials)
    stop_at_step: int | None = None  # checkpoint and return "stopped" after this step
    fault: FaultInjection | None = None
    threads: int = 1  # torch threads per worker
    dinov2: ModuleRecipe | None = None  # a built DINOv2 instead of discriminator.dinov2 (tests)


@dataclass
class ModuleRecipe:
    """A built transformers model as class, config and weights, rebuilt on the worker: a pickled
    transformers 5 model loses its output recording (``output_hidden_states`` gives None)."""

    cls: type
    config: dict
    state: dict

    @classmethod
    def of(cls, model: nn.Module) -> ModuleRecipe:
        return cls(type(model), model.config.to_dict(), {k: v.detach().clone() for k, v in model.state_dict().items()})

    def build(self) -> nn.Module:
        model = self.cls(self.cls.config_class.from_dict(self.config))
        model.load_state_dict(self.state)
        return model.eval()


class NonFiniteLoss(Exception):
    """Raised on every rank at once (after the all-gather) when any rank's loss went non-finite."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def step_seed(seed: int, step: int, index: int, update: int = 0) -> int:
    """The seed of one micro-batch's randomness: a pure function of (seed, step, global index) and,
    for the extra heads' updates, which one (``update`` ≥ 1)."""
    entropy = [seed, step, index] + ([update] if update else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (same length on all ranks), in rank order."""
    local = torch.tensor(values, dtype=torch.float64, device=device)
    if not distributed():
        return [local.tolist()]
    out = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def _broadcast(obj, rank: int):
    if not distributed():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _apply_env(env: dict[str, str]) -> None:
    """The job's ``env`` on this worker, ``${env:NAME}`` references resolved here (never on the driver);
    a variable the launcher already set (Ray's runtime_env, a Kubernetes Secret) is left as it is."""
    os.environ.update(resolve_secrets({k: v for k, v in env.items() if k not in os.environ}))


class ADDLoop:
    """Everything one worker holds: the sharded models, optimizers, EMA, data position."""

    def __init__(self, spec: TrainJob, options: LoopOptions):
        self.spec, self.options = spec, options
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        torch.set_num_threads(options.threads)
        _apply_env(spec.env)
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # FSDP's default mesh and NCCL use the current device
        t, precision = spec.train, spec.train.mixed_precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.accum = t.grad_accum
        self.micro_batch_size = t.batch_size // (self.world * self.accum)

        dinov2 = options.dinov2.build() if options.dinov2 is not None else None
        self.models = build_models(spec, self.device, dinov2=dinov2)
        self.objective = build_objective(spec)
        self.sharded = spec.resources.fsdp and distributed()
        if self.sharded:
            shard_unet(self.models.student.unet, root=True)
            shard_unet(self.models.teacher.unet, root=False)  # see fsdp.py: LADD cuts its forward short
        # without FSDP the student is replicated: its gradients are averaged like the heads'
        self.student_sync = None if self.sharded else ReplicaSync(self.models.student)
        self.heads = self.models.discriminator.heads
        self.step_keys = STEP_KEYS + head_keys(len(self.heads))
        self.heads_monitor = HeadsMonitor(len(self.heads))
        self.head_sync = ReplicaSync(self.heads)
        self.head_sync.broadcast()
        self.opt_g, self.opt_d = build_optimizers(spec, self.models)
        self.ema = EMA(self.models.student, t.ema_decay) if t.ema_decay else None
        self.state = TrainState(
            micro_batch_size=self.micro_batch_size, world_size=self.world, grad_accum=self.accum, seed=t.seed
        )
        self.restored_from = -1
        self.token = _broadcast(uuid.uuid4().hex[:8], self.rank)  # this attempt's checkpoint names
        self.interval = IntervalMetrics()

    # ---- state ----------------------------------------------------------------------------------

    def _model_state(self) -> dict:
        return model_state(self.models.student, self.opt_g, self.heads, self.opt_d, self.ema)

    def restore(self) -> int:
        """Load the latest checkpoint Ray registered, if any; returns micro-batches to skip."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0
        state = self._model_state()
        with self._fetched(checkpoint) as folder:
            saved = load_checkpoint(folder, state, self.rank, self.world)
        apply_model_state(state, self.models.student, self.opt_g, self.heads, self.opt_d)
        if self.ema is not None and "ema" not in state:  # EMA switched on at this resume: start it here
            self.ema = EMA(self.models.student, self.spec.train.ema_decay)
        set_hyperparameters(self.spec, self.opt_g, self.opt_d)
        self.head_sync.broadcast()
        self.state.step = self.restored_from = saved.step
        return saved.skip_for(self.micro_batch_size, self.world)

    def _checkpoint(self, metrics: dict) -> None:
        folder = Path(tempfile.mkdtemp(prefix=f"add-ckpt-{self.rank}-"))
        try:
            save_checkpoint(folder, self._model_state(), self.state, self.rank)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                checkpoint_dir_name=f"checkpoint_{self.state.step:08d}_{self.token}",
                checkpoint_upload_fn=self._upload,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _upload(self, checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        """This rank's checkpoint files into the run's folder ``name``, one file at a time (on object
        storage each write retries through a restarting server: ``workers.data.transfer``). Ray Train
        registers the folder once every rank's upload returned: a partial one is never read."""
        storage = ray.train.get_context().get_storage()
        fs, path = storage.storage_filesystem, storage.build_checkpoint_path_from_name(name)
        with checkpoint.as_directory() as local:
            upload_folder(local, fs, path)
        return ray.train.Checkpoint(path=path, filesystem=fs)

    @contextmanager
    def _fetched(self, checkpoint: ray.train.Checkpoint):
        """A local folder holding ``checkpoint``: on object storage a copy (retried like the uploads)."""
        if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
            yield checkpoint.path
            return
        folder = Path(tempfile.mkdtemp(prefix=f"add-restore-{self.rank}-"))
        try:
            download_folder(checkpoint.filesystem, checkpoint.path, folder)
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- one step -------------------------------------------------------------------------------

    def _micro_batch(self, stream: BatchStream, step: int, i: int, update: int = 0):
        """Micro-batch ``i`` of this rank, its generator (seeded as the module docstring says), the wait."""
        waited = time.perf_counter()
        rows = next(stream)
        wait = time.perf_counter() - waited
        batch = make_batch(self.models.teacher, rows, self.device)
        seed = step_seed(self.spec.train.seed, step, self.rank * self.accum + i, update)
        torch.manual_seed(seed)
        return batch, torch.Generator().manual_seed(seed), wait

    def _autocast(self):
        """bf16 autocast where the job asks for it (train.mixed_precision), else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def _updates(self) -> tuple[Update, Update]:
        """This step's updates of θ and of the heads, over this rank's micro-batches (rebuilt each step:
        a restore may replace the parameters)."""
        theta = self.models.student.trainable_parameters()
        max_norm = self.objective.max_grad_norm
        return (
            Update(theta, self.opt_g, max_norm, self.accum),
            Update(self.head_sync.params, self.opt_d, max_norm, self.accum),
        )

    def discriminator_update(self, stream: BatchStream, update: int) -> float:
        """One extra update of the heads (``update`` ≥ 1) on fresh real micro-batches and fresh student
        samples; θ gets no gradient. Returns the data wait."""
        step, models, objective = self.state.step, self.models, self.objective
        heads = self._updates()[1]
        heads.zero_grad()
        autocast = self._autocast()
        wait, local = 0.0, np.zeros(len(DISCRIMINATOR_KEYS))
        for i in range(self.accum):
            batch, generator, waited = self._micro_batch(stream, step, i, update)
            wait += waited
            with autocast:
                fake = student_sample(models, batch, generator)
            metrics = discriminator_backward(models, objective, batch, fake, heads, step, generator, autocast)
            local += np.array([metrics[k] for k in DISCRIMINATOR_KEYS]) / self.accum
        self.head_sync.all_reduce_grads()
        norm_d = full_norm(heads.clip())
        per_rank = _gather(local.tolist(), self.device)
        self._check_finite(step + 1, DISCRIMINATOR_KEYS, per_rank, {"grad_norm/discriminator": norm_d})
        heads.step()
        return wait

    def train_step(self, stream: BatchStream) -> tuple[dict[str, float], float, float]:
        """One optimizer step; returns the global metrics, the data wait and the step time."""
        start, wait = time.perf_counter(), 0.0
        step, models, objective = self.state.step, self.models, self.objective
        for update in range(1, self.spec.train.discriminator_steps):
            wait += self.discriminator_update(stream, update)
        theta, heads = self._updates()
        theta.zero_grad()
        heads.zero_grad()
        autocast = self._autocast()
        keys = self.step_keys
        local = np.zeros(len(keys))
        # before each report, θ's gradient of the first micro-batch is split into its two terms
        measure = (step + 1) % self.spec.train.log_every == 0
        split = {}
        for i in range(self.accum):
            batch, generator, waited = self._micro_batch(stream, step, i)
            wait += waited
            metrics, fake = student_backward(models, objective, batch, theta, generator, measure and i == 0, autocast)
            if measure and i == 0:
                split = {k: metrics[k] for k in THETA_KEYS if k in metrics}
            metrics |= discriminator_backward(models, objective, batch, fake, heads, step, generator, autocast)
            local += np.array([metrics[k] for k in keys]) / self.accum
        if measure:  # the split ran on every rank (its norms are global under FSDP): rank 0's are reported
            keys, local = keys + THETA_KEYS, np.concatenate([local, [split.get(k, 0.0) for k in THETA_KEYS]])
        self.head_sync.all_reduce_grads()
        if self.student_sync is not None:
            self.student_sync.all_reduce_grads()
        norm_g = full_norm(theta.clip())
        norm_d = full_norm(heads.clip())

        per_rank = _gather(local.tolist(), self.device)
        norms = {"grad_norm/student": norm_g, "grad_norm/discriminator": norm_d}
        values = {k: float(np.mean([row[j] for row in per_rank])) for j, k in enumerate(keys)} | norms
        self._check_finite(step + 1, keys, per_rank, norms)
        set_student_lr(self.spec, self.opt_g, step)
        theta.step()
        heads.step()
        if self.ema is not None:
            self.ema.update(models.student)
        return values, wait, time.perf_counter() - start

    def _check_finite(
        self, step: int, keys: tuple[str, ...], per_rank: list[list[float]], norms: dict[str, float]
    ) -> None:
        problems = []
        for r, row in enumerate(per_rank):
            bad = non_finite(dict(zip(keys, row, strict=True)))
            if bad:
                shown = ", ".join(f"{k}={v}" for k, v in bad.items())
                problems.append(f"rank {r}: {shown}")
        bad_norms = non_finite(norms)
        if bad_norms:
            problems.append(", ".join(f"{k}={v}" for k, v in bad_norms.items()))
        if problems:
            raise NonFiniteLoss(step, f"non-finite loss at step {step}: {'; '.join(problems)}")

    # ---- reporting ------------------------------------------------------------------------------

    def _report(self, checkpoint: bool) -> dict:
        """``ray.train.report`` of the interval's metrics (all ranks: it is a barrier), with a checkpoint."""
        student_params = self.models.student.trainable_parameters()
        per_rank = _gather([*self.interval.local_timing(), state_bytes(student_params, self.opt_g)], self.device)
        state_per_rank = [row[-1] for row in per_rank]
        metrics = {
            "status": "running",
            "step": self.state.step,
            "data/epoch": self.stream.epoch,
            "data/micro_batches": self.stream.consumed,
            **self.interval.summary(per_rank),
            "lr/student": self.opt_g.param_groups[0]["lr"],
            "lr/discriminator": self.opt_d.param_groups[0]["lr"],
            "memory/student_state_bytes_per_rank": state_per_rank,
            "memory/student_state_bytes_max": max(state_per_rank),
            "world_size": self.world,
            "resume/restored_from_step": self.restored_from,
            **self.sharding,
        }
        self.state.micro_batches = self.stream.consumed
        warning = self.heads_monitor.update(self.state.step, metrics)
        self.last_balance = balance_summary(metrics)
        if warning and self.rank == 0:
            tqdm.write(f"WARNING: {warning}", file=sys.stderr)
        if checkpoint:
            self._checkpoint(metrics)
        else:
            ray.train.report(metrics)
        if self.rank == 0:
            for callback in self.options.callbacks:
                callback.on_log(self.state.step, metrics)
        self.interval.reset()
        return metrics

    def _sharding_info(self) -> dict:
        fractions = local_fractions(self.models.student) or [1.0]
        lo, hi = zip(*_gather([min(fractions), max(fractions)], self.device), strict=True)
        return {
            "fsdp/sharded": float(self.sharded),
            "fsdp/local_fraction_min": min(lo),
            "fsdp/local_fraction_max": max(hi),
        }

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> dict:
        """Restore, train to ``train.steps`` (or ``stop_at_step``), export; returns the summary."""
        t, options = self.spec.train, self.options
        skip = self.restore()
        self.sharding = self._sharding_info()
        self.stream = BatchStream(ray.train.get_dataset_shard("train"), self.micro_batch_size, skip=skip)
        if self.rank == 0:
            info = {"rank": self.rank, "world_size": self.world, "restored_from_step": self.restored_from}
            for callback in options.callbacks:
                callback.on_start(info | self.sharding)
        status, message, last_step = "completed", "", None
        # progress on rank 0 only (Ray streams it to the driver's console)
        bar = tqdm(total=t.steps, initial=self.state.step, desc="ADD steps", disable=self.rank != 0, mininterval=5)
        try:
            while self.state.step < t.steps:
                values, wait, step_s = self.train_step(self.stream)
                self.state.step += 1
                bar.update(1)
                self.interval.add_step(values, t.batch_size, wait, step_s)
                step = self.state.step
                stop = step == options.stop_at_step
                save = step % t.checkpoint_every == 0 or step == t.steps or stop
                if save or step % t.log_every == 0:
                    self._report(checkpoint=save)
                if step % t.sample_every == 0 and options.callbacks:
                    self._samples()
                self._maybe_fault(step)
                if stop and step < t.steps:
                    status = "stopped"
                    break
        except NonFiniteLoss as err:
            status, message, last_step = "non_finite", str(err), err.step
            ray.train.report({"status": status, "step": err.step, "message": message})
        bar.close()
        export_uri = self.export() if status == "completed" else None
        summary = {
            "status": status,
            "step": last_step or self.state.step,
            "restored_from_step": self.restored_from,
            "export_uri": export_uri,
            "message": message,
            "warnings": self.heads_monitor.warnings[-1:],  # the latest: the state the run ended in
            "balance": getattr(self, "last_balance", None),
        }
        if self.rank == 0:
            for callback in options.callbacks:
                callback.on_end(summary)
        return summary

    @torch.no_grad()
    def _samples(self) -> None:
        """One-step samples for ``train.sample_prompts`` from the weights the export will hold (the EMA's
        when there is one; every rank runs them: θ is sharded)."""
        from workers.add.sampler import sample_student
        from workers.eval.images import model_shape

        teacher, spec = self.models.teacher, self.spec
        prompts = spec.train.sample_prompts or ([] if teacher.prompt_encoder is not None else [""] * 4)
        if not prompts:
            return
        cond = teacher.encode_prompts(prompts).to(self.device) if teacher.prompt_encoder is not None else None
        shape = model_shape(teacher, len(prompts), spec.data.resolution)  # the family's latents at the data's size
        generator = torch.Generator().manual_seed(spec.train.seed)
        autocast = self._autocast()
        weights = self.ema.swapped_in(self.models.student) if self.ema is not None else nullcontext()
        with autocast, weights:
            x0 = sample_student(self.models.student, cond, shape, steps=1, generator=generator)
            images = teacher.codec.decode(x0) if teacher.codec is not None else x0
        if self.rank == 0:
            images = ((images.float().cpu() + 1) / 2).clamp(0, 1)
            for callback in self.options.callbacks:
                callback.on_samples(self.state.step, images)

    def _maybe_fault(self, step: int) -> None:
        fault = self.options.fault
        if fault and self.rank == fault.rank and step == fault.after_step and not os.path.exists(fault.marker):
            # The controller registers reports asynchronously; one still in flight when its worker dies
            # is lost (the run then resumes from the one before). Kill once it has caught up, so the
            # test knows which checkpoint the resume must come from.
            ray.train.get_all_reported_checkpoints(timeout_s=120)
            Path(fault.marker).write_text(f"killed pid {os.getpid()} after step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    # ---- export ---------------------------------------------------------------------------------

    def export(self) -> str | None:
        """The final student (the EMA when kept) as a diffusers folder at ``export_path``, from a
        consolidated state dict written by rank 0; skipped when a complete export is already there."""
        fs, path = self.options.export_filesystem, self.options.export_path
        if fs is None or path is None:
            return None
        # the same step already exported (a retried last attempt): keep it; an earlier step's export
        # (a job run again with more steps) is replaced
        if _broadcast(self.rank == 0 and export_step(fs, path) == self.state.step, self.rank):
            return self.options.export_uri
        full = consolidated_state(self.models.student, self.ema, self.rank)
        if self.rank == 0:
            remove_export(fs, path)
            student = export_copy(self.spec, self.models.teacher, full)
            metadata = {"job": self.spec.name, "step": self.state.step, "ema": self.ema is not None}
            write_export(student, self.models.teacher, fs, path, metadata)
        if distributed():
            dist.barrier()
        return self.options.export_uri


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train entry point. ``config``: ``{"spec": TrainJob as a dict, "options": LoopOptions}``."""
    spec = TrainJob.model_validate(config["spec"])
    return ADDLoop(spec, config.get("options") or LoopOptions()).run()
