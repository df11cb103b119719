"""The final student of a distributed run, exported once as a diffusers folder into the run's storage.

Every rank takes part in gathering the sharded student (and its EMA) into one full state dict on
rank 0 (``consolidated_state``, a collective); rank 0 alone builds an unsharded copy and writes it
(``write_export``): on a local filesystem with ``export_student``'s atomic rename, on object storage
by uploading the folder with ``add_student.json`` last (``workers.data.transfer.upload_folder``), the
file ``load_student`` looks for, so a reader never sees a partial export.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from workers.train.ema import EMA

# workers.add.export is imported where it is used: it loads the diffusers pipelines, slow to import
# on every worker for something rank 0 does once at the end.


def export_exists(fs: pafs.FileSystem, path: str) -> bool:
    """A complete export is at ``path``: its marker file, written last, is there."""
    from workers.add.export import STUDENT_FILE

    return fs.get_file_info(f"{path}/{STUDENT_FILE}").type == pafs.FileType.File


def export_step(fs: pafs.FileSystem, path: str) -> int | None:
    """The training step of the complete export at ``path`` (None when there is none)."""
    import json

    from workers.add.export import STUDENT_FILE

    if not export_exists(fs, path):
        return None
    with fs.open_input_stream(f"{path}/{STUDENT_FILE}") as f:
        return json.loads(f.read().decode()).get("step")


def remove_export(fs: pafs.FileSystem, path: str) -> None:
    """Delete a stale export (of an earlier step): its marker first, so it is never read half-deleted."""
    from workers.add.export import STUDENT_FILE

    if export_exists(fs, path):
        fs.delete_file(f"{path}/{STUDENT_FILE}")
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def consolidated_state(student: nn.Module, ema: EMA | None, rank: int) -> dict[str, torch.Tensor]:
    """The full state dict of ``student`` on rank 0 (empty elsewhere), its trainable parameters replaced
    by the EMA's when there is one. Collective: every rank calls it."""
    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:  # every rank gathers each shadow in the same order; rank 0 keeps them
        for name in sorted(ema.shadow):
            shadow = ema.shadow[name]
            value = shadow.full_tensor() if isinstance(shadow, DTensor) else shadow
            if rank == 0:
                full[name] = value.detach().cpu()
    return full


def write_export(student, teacher, fs: pafs.FileSystem, path: str, metadata: dict) -> None:
    """``export_student`` into ``path`` on ``fs``, complete or absent."""
    from workers.add.export import STUDENT_FILE, export_student
    from workers.data.transfer import upload_folder

    if isinstance(fs, pafs.LocalFileSystem):
        export_student(student, teacher, path, metadata=metadata)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "student"
        export_student(student, teacher, local, metadata=metadata)
        upload_folder(local, fs, path, last=STUDENT_FILE)
