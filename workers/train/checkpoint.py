"""Checkpoints of a distributed ADD run: sharded state through torch.distributed.checkpoint (DCP).

Layout of one checkpoint folder (Ray Train merges every rank's files into it)::

    .metadata                DCP's index, written by rank 0
    __<rank>_0.distcp        each rank's shards: θ (trainable parameters), θ's AdamW state, the EMA,
                             and, once (DCP deduplicates replicated tensors), the heads φ and their AdamW state
    train_state.json         rank 0: step, data position, seed, world size, batch geometry
    rng/rank_<rank>.pt       each rank's torch / numpy / python RNG states

Save: every rank calls ``save_checkpoint`` (a collective) into its own temporary folder and
reports it with ``ray.train.report(checkpoint=..., checkpoint_dir_name=...)``. Load: from a local
copy of the checkpoint folder, ``dcp.load`` reads into the state dicts of the current models,
resharding when the number of workers changed. Only checkpoints Ray registered are ever read
(``ray.train.get_checkpoint()``): a folder left half-uploaded by a dying worker is never looked at.

Data position: Ray Data's iterators keep no mid-stream position, so the checkpoint records how
many micro-batches each rank had consumed; the data order is a pure function of (seed, epoch)
(and, for a given number of workers, so is each rank's share), and a resumed run skips that many
micro-batches. With another number of workers it skips the same number of rows, split over the
new ranks (the same rows exactly when the new share lines up; see ``TrainState.skip_for``).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from workers.train.ema import EMA

TRAIN_STATE = "train_state.json"
RNG_DIR = "rng"
# Frozen parameters (the LoRA student's base weights) equal the teacher's: not worth saving.
_STUDENT_OPTIONS = StateDictOptions(ignore_frozen_params=True)


@dataclass
class TrainState:
    """Where a run stands, besides the tensors."""

    step: int = 0  # optimizer steps completed
    micro_batches: int = 0  # micro-batches each rank has taken from its data shard
    micro_batch_size: int = 0  # rows per micro-batch and rank
    world_size: int = 1
    grad_accum: int = 1
    seed: int = 0

    @property
    def rows_consumed(self) -> int:
        return self.micro_batches * self.micro_batch_size * self.world_size

    def skip_for(self, micro_batch_size: int, world_size: int) -> int:
        """Micro-batches each rank of a run with this geometry skips to resume the data stream."""
        if (micro_batch_size, world_size) == (self.micro_batch_size, self.world_size):
            return self.micro_batches
        return self.rows_consumed // (micro_batch_size * world_size)


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def model_state(
    student: nn.Module,
    optimizer_student: torch.optim.Optimizer,
    heads: nn.Module,
    optimizer_heads: torch.optim.Optimizer,
    ema: EMA | None,
) -> dict:
    """The state dict DCP saves and loads in place: θ, φ, both optimizers, the EMA."""
    student_sd, student_osd = get_state_dict(student, optimizer_student, options=_STUDENT_OPTIONS)
    heads_sd, heads_osd = get_state_dict(heads, optimizer_heads)
    state = {"student": student_sd, "optim_student": student_osd, "heads": heads_sd, "optim_heads": heads_osd}
    if ema is not None:
        state["ema"] = ema.state_dict()
    return state


def apply_model_state(
    state: dict,
    student: nn.Module,
    optimizer_student: torch.optim.Optimizer,
    heads: nn.Module,
    optimizer_heads: torch.optim.Optimizer,
) -> None:
    """Put a loaded ``model_state`` back into the modules and optimizers (the EMA loads in place)."""
    set_state_dict(
        student,
        optimizer_student,
        model_state_dict=state["student"],
        optim_state_dict=state["optim_student"],
        options=_STUDENT_OPTIONS,
    )
    set_state_dict(heads, optimizer_heads, model_state_dict=state["heads"], optim_state_dict=state["optim_heads"])


def save_checkpoint(folder: str | Path, state: dict, train_state: TrainState, rank: int) -> Path:
    """Write this rank's part of a checkpoint into ``folder`` (collective: every rank calls it)."""
    folder = Path(folder)
    dcp.save(state, checkpoint_id=str(folder))
    if rank == 0:
        (folder / TRAIN_STATE).write_text(json.dumps(asdict(train_state), indent=1))
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(rng_states(), folder / RNG_DIR / f"rank_{rank:05d}.pt")
    return folder


class IncompatibleCheckpoint(ValueError):
    """A checkpoint written by another model shape (the job's model settings changed since)."""


def load_checkpoint(folder: str | Path, state: dict, rank: int, world_size: int) -> TrainState:
    """Read a checkpoint folder into ``state`` in place (dropping its "ema" entry when the checkpoint
    has none); restores this rank's RNG states when the world size is the one it was saved with.
    Returns the saved ``TrainState``."""
    folder = Path(folder)
    train_file = folder / TRAIN_STATE
    if not train_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {TRAIN_STATE}: not a checkpoint of this trainer")
    train_state = TrainState(**json.loads(train_file.read_text()))
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if "ema" in state and not any(key.startswith("ema.") for key in saved):
        del state["ema"]  # saved without an EMA: the caller starts one from the loaded weights
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except (Exception, dcp.api.CheckpointException) as err:  # a BaseException that carries the planner's text
        if "Size mismatch" not in str(err) and "Missing key" not in str(err):
            raise
        detail = next((line for line in str(err).splitlines() if "mismatch" in line or "Missing" in line), "")
        raise IncompatibleCheckpoint(
            f"the checkpoint {folder} holds a different model than this job builds ({detail.strip()[:300]}): "
            "the job's model settings changed since it was written. Give the run another name or storage "
            "folder, or delete that run's folder, to start afresh"
        ) from None
    rng_file = folder / RNG_DIR / f"rank_{rank:05d}.pt"
    if train_state.world_size == world_size and rng_file.is_file():
        set_rng_states(torch.load(rng_file, weights_only=False))
    return train_state
