"""Synthetic image-caption sets (LADD): the teacher's own samples for a prompt set, written as shards.

The set is an ordinary shard set (``shards.py``: same schema, same commit protocol, same manifest),
so training reads it through the normal ingest; its manifest adds ``synthetic``, the provenance: the
teacher (source and fingerprint), its sampler (solver, steps, guidance), the seed and the prompts.

The data job, nothing held on the driver but the plan::

    prompts x images_per_prompt -> samples in order, cut into shards of rows_per_shard (the plan)
    from_items(one row per shard not yet committed)
      -> map_batches(TeacherSampler, batch_size=1, concurrency=actors, num_gpus=1 when the cluster
             has GPUs)      each actor loads the teacher once; per shard it samples batches of
             batch_size, decodes latents, encodes PNGs and commits the shard (whole or absent)
      -> the driver counts finished shards (its progress bar), then commits ``_manifest.json``

Determinism: the noise of a shard's b-th batch comes from a generator seeded with (seed, shard, b),
so the same prompts, seed, images_per_prompt, rows_per_shard and batch_size give the same images
whatever the number of actors or the order they finish in.

Resume: the plan (``_synthesis.json``: settings, a hash of the prompts, each shard's samples) is
committed first. A rerun with the same plan keeps the shards already committed and makes the rest; a
different plan, or a finished set, is refused unless ``overwrite``, which clears the set first (never a
set that is not synthetic: that one is left to its owner). Nothing is half-written: each shard and
the manifest are committed atomically, and the manifest, the completion marker, comes last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .shards import MANIFEST_NAME, commit_manifest, commit_shard, read_manifest
from .storage import StorageError, StorageOptions, check_reachable, commit_bytes, display_uri, redact, resolve

__all__ = [
    "PLAN_NAME",
    "PromptError",
    "SynthesisConfig",
    "SyntheticDataError",
    "TeacherSampler",
    "check_provenance",
    "plan_shards",
    "provenance_params",
    "read_prompts",
    "synthesize",
]

log = logging.getLogger(__name__)

PLAN_NAME = "_synthesis.json"  # readers skip "_" names: the plan is never mistaken for data


class PromptError(ValueError):
    """The prompt set cannot be used: the message names the file, the line and what is wrong."""


class SyntheticDataError(ValueError):
    """A synthetic set cannot be made there, or is not what a job in synthetic mode needs."""


@dataclass(frozen=True)
class SynthesisConfig:
    """How the teacher makes a synthetic set: which teacher, its sampler, and the seeds."""

    teacher: str  # diffusers folder or hub id (the job's teacher.source)
    prediction_type: str | None = None  # the job's teacher.prediction_type
    resolution: int | None = None  # the job's teacher.resolution (SDXL micro-conditioning)
    solver: str = "ddim"  # the teacher's sampler: one of workers.add.sampler.TEACHER_SOLVERS
    steps: int = 50  # sampler steps
    guidance_scale: float = 5.0  # classifier-free guidance scale
    images_per_prompt: int = 1  # samples per prompt, each with its own noise
    seed: int = 0  # the noise of every batch derives from it
    batch_size: int = 16  # images per teacher call
    rows_per_shard: int = 1000  # images per shard (and per unit of work and of resume)
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU

    def __post_init__(self):
        from workers.add.sampler import TEACHER_SOLVERS  # the samplers the teacher has (more as families land)

        if self.solver not in TEACHER_SOLVERS:
            allowed = ", ".join(TEACHER_SOLVERS)
            raise ValueError(f"solver: unknown teacher solver {self.solver!r}; allowed: {allowed}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision: {self.precision!r}; allowed: auto, bf16, fp32")
        for name in ("steps", "images_per_prompt", "batch_size", "rows_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale: must be at least 1, got {self.guidance_scale}")

    def sampler(self) -> dict:
        """The sampler as recorded in the manifest."""
        return {"solver": self.solver, "steps": self.steps, "guidance_scale": self.guidance_scale}


# ---- the prompt set ---------------------------------------------------------------------------------


def read_prompts(path: str | Path, max_chars: int = 1000) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (surrounding spaces and blank lines dropped).

    Refused, naming the line: no prompt at all, a prompt seen before (each prompt once: more samples of
    one prompt is ``images_per_prompt``), one longer than ``max_chars``, control characters.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PromptError(f"{path}: no such prompt file") from None
    except IsADirectoryError:
        raise PromptError(f"{path}: a folder, not a prompt file (one prompt per line)") from None
    except UnicodeDecodeError as err:
        raise PromptError(f"{path}: not UTF-8 text (byte {err.start}); one prompt per line") from None
    prompts: list[str] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        prompt = line.strip()
        if not prompt:
            continue
        if any(unicodedata.category(c) == "Cc" for c in prompt):
            raise PromptError(f"{path}, line {number}: a control character in the prompt")
        if len(prompt) > max_chars:
            raise PromptError(
                f"{path}, line {number}: a prompt of {len(prompt):,} characters, more than the {max_chars:,} allowed"
            )
        if prompt in seen:
            raise PromptError(
                f"{path}, line {number}: repeats line {seen[prompt]} ({_short(prompt)}); give each prompt once "
                "and ask for more images per prompt instead"
            )
        seen[prompt] = number
        prompts.append(prompt)
    if not prompts:
        raise PromptError(f"{path}: no prompts (the file is empty or holds only blank lines); one prompt per line")
    return prompts


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def prompts_digest(prompts: list[str]) -> str:
    """sha256 of the prompt list in its order: what the plan and the manifest record of the prompts."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


# ---- the plan ---------------------------------------------------------------------------------------


def plan_shards(prompts: list[str], images_per_prompt: int, rows_per_shard: int) -> list[dict]:
    """The shards of the set in order: ``{"index", "name", "captions", "samples"}``, where sample j of a
    prompt is its j-th image. Prompt-major, so a shard holds few distinct prompts for the text encoder."""
    samples = [(prompt, j) for prompt in prompts for j in range(images_per_prompt)]
    shards = []
    for index, start in enumerate(range(0, len(samples), rows_per_shard)):
        chunk = samples[start : start + rows_per_shard]
        shards.append(
            {
                "index": index,
                "name": f"shard-{index:05d}.parquet",
                "captions": [p for p, _ in chunk],
                "samples": [j for _, j in chunk],
            }
        )
    return shards


def _plan_document(config: SynthesisConfig, prompts: list[str], shards: list[dict], fingerprint: str | None) -> dict:
    """What a rerun must match to keep the shards already made (and what the manifest records)."""
    return {
        "teacher": {
            "source": config.teacher,
            "fingerprint": fingerprint,
            "prediction_type": config.prediction_type,
            "resolution": config.resolution,
        },
        "sampler": config.sampler(),
        "seed": config.seed,
        "images_per_prompt": config.images_per_prompt,
        "batch_size": config.batch_size,
        "rows_per_shard": config.rows_per_shard,
        "precision": config.precision,
        "prompts": len(prompts),
        "prompts_sha256": prompts_digest(prompts),
        "shards": [{"name": s["name"], "rows": len(s["captions"])} for s in shards],
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plans."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def batch_seed(seed: int, shard: int, batch: int) -> int:
    """The seed of a shard's ``batch``-th teacher call: a pure function of (seed, shard, batch)."""
    import numpy as np

    return int(np.random.SeedSequence([seed, shard, batch]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ---- the actors ---------------------------------------------------------------------------------------


class TeacherSampler:
    """Map-batches callable class: one row per shard -> the shard sampled by the teacher and committed.

    The teacher is loaded once per actor (on its GPU when it has one). A shard already committed under
    its final name (a resumed job) is kept: shards appear whole or not at all.
    """

    def __init__(self, config: SynthesisConfig, fs: pafs.FileSystem, root: str, uri: str):
        import torch

        from workers.add.components import load_teacher

        self.config, self.uri = config, uri
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device == "cuda")
        self.teacher = load_teacher(
            config.teacher,
            prediction_type=config.prediction_type,
            resolution=config.resolution,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            device=self.device,
        )
        self.fs, self.root = fs, root  # resolved on the driver: its endpoint and credentials travel with it

    def _committed_rows(self, name: str) -> int | None:
        path = posixpath.join(self.root, name)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        return pq.ParquetFile(self.fs.open_input_file(path)).metadata.num_rows

    def images(self, captions: list[str], seed: int) -> list[bytes]:
        """PNG bytes of the teacher's samples for ``captions`` (one teacher call), noise from ``seed``."""
        import torch

        from workers.add.sampler import sample_teacher
        from workers.eval.images import conditioning, model_shape, png_bytes, to_pixels, to_uint8

        c = self.config
        generator = torch.Generator().manual_seed(seed)
        x0 = sample_teacher(
            self.teacher,
            conditioning(self.teacher, captions),
            model_shape(self.teacher, len(captions)),
            c.steps,
            generator,
            solver=c.solver,
            guidance_scale=c.guidance_scale,
        )
        return [png_bytes(image) for image in to_uint8(to_pixels(self.teacher, x0))]

    def make_shard(self, index: int, name: str, captions: list[str]) -> tuple[int, bool]:
        """Commit shard ``name`` (unless it is already there); returns (rows, whether it was kept)."""
        if (rows := self._committed_rows(name)) == len(captions):
            return rows, True
        size = self.config.batch_size
        images: list[bytes] = []
        for b, start in enumerate(range(0, len(captions), size)):
            images += self.images(captions[start : start + size], batch_seed(self.config.seed, index, b))
        columns = {"image": images, "caption": list(captions), "label": [None] * len(captions)}
        commit_shard(self.fs, self.root, name, columns, self.uri)
        return len(captions), False

    def __call__(self, batch: dict) -> dict:
        out: dict[str, list] = {"name": [], "rows": [], "kept": []}
        for index, name, captions in zip(batch["index"], batch["name"], batch["captions"], strict=True):
            rows, kept = self.make_shard(int(index), str(name), [str(c) for c in captions])
            out["name"].append(str(name))
            out["rows"].append(rows)
            out["kept"].append(kept)
        return out


# ---- the data job --------------------------------------------------------------------------------------


def _read_json(fs: pafs.FileSystem, path: str) -> dict | None:
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _clear(fs: pafs.FileSystem, root: str) -> None:
    """Remove a synthetic set's own files (the manifest first: the set is then unfinished, never wrong)."""
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    names = {i.base_name for i in infos if i.type == pafs.FileType.File}
    ours = [MANIFEST_NAME] if MANIFEST_NAME in names else []
    ours += sorted(n for n in names if n.startswith("shard-") and n.endswith(".parquet"))
    ours += sorted(n for n in names if n.startswith("_") and n.endswith(".tmp"))
    ours += [PLAN_NAME] if PLAN_NAME in names else []
    for name in ours:
        fs.delete_file(posixpath.join(root, name))


def _prepare_location(fs: pafs.FileSystem, root: str, uri: str, plan: dict, overwrite: bool) -> None:
    """Refuse a location holding anything but this plan's unfinished set; with ``overwrite`` clear a
    synthetic one. Leaves the plan committed there."""
    shown = display_uri(uri)
    manifest = _read_json(fs, posixpath.join(root, MANIFEST_NAME))
    old = _read_json(fs, posixpath.join(root, PLAN_NAME))
    if manifest is not None and "synthetic" not in manifest:
        raise SyntheticDataError(
            f"{shown}: holds a finished shard set that is not synthetic ({manifest.get('rows')} rows): it is never "
            "overwritten; choose another location"
        )
    if manifest is None and old is None:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        foreign = [
            i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(("_", "."))
        ]
        if foreign:
            raise SyntheticDataError(
                f"{shown}: holds {len(foreign)} file(s) that are no synthetic set ({', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose an empty location"
            )
    if manifest is not None:
        if not overwrite:
            raise SyntheticDataError(
                f"{shown}: a finished synthetic set is there already ({manifest.get('rows')} images); "
                "overwrite it explicitly (--overwrite) or choose another location"
            )
        _clear(fs, root)
    elif old is not None and _differences(old, plan):
        if not overwrite:
            changed = ", ".join(_differences(old, plan)[:5])
            raise SyntheticDataError(
                f"{shown}: holds an unfinished synthetic set made with other settings ({changed} differ); "
                "run again with the same settings to finish it, or start over with --overwrite"
            )
        _clear(fs, root)
    data = json.dumps(plan, indent=1).encode()
    commit_bytes(fs, posixpath.join(root, PLAN_NAME), lambda out: out.write(data))


def synthesize(
    config: SynthesisConfig,
    prompts: list[str],
    uri: str,
    *,
    options: StorageOptions | None = None,
    overwrite: bool = False,
    actors: int | None = None,
    num_gpus: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Make the synthetic set of ``prompts`` at ``uri`` with the teacher (on the connected Ray); returns
    its manifest. ``actors``: teacher actors (default: one per GPU, else 1); ``num_gpus``: per actor
    (default: 1 when the cluster has GPUs, else 0); ``on_progress(images_done, images_total)`` after
    each shard. Raises ``SyntheticDataError`` for a location that holds something else."""
    import ray

    if not prompts:
        raise PromptError("no prompts")
    check_reachable(uri, options, must_exist=False)
    fs, root = resolve(uri, options)
    try:
        fs.create_dir(root, recursive=True)
    except OSError:
        pass  # object storage: a prefix needs no folder
    shards = plan_shards(prompts, config.images_per_prompt, config.rows_per_shard)
    plan = _plan_document(config, prompts, shards, _fingerprint(config.teacher))
    try:
        _prepare_location(fs, root, uri, plan, overwrite)
    except OSError as err:
        raise StorageError(f"{display_uri(uri)}: {redact(str(err))}") from None
    total = sum(len(s["captions"]) for s in shards)
    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus is None:
        num_gpus = 1.0 if gpus >= 1 else 0.0
    actors = actors or max(1, int(gpus // num_gpus) if num_gpus else 1)
    actors = min(actors, len(shards))
    items = [{"index": s["index"], "name": s["name"], "captions": s["captions"]} for s in shards]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        TeacherSampler,
        fn_constructor_args=(config, fs, root, uri),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus,
        num_cpus=None if num_gpus else 1,
    )
    done, made = 0, {}
    for row in ds.iter_rows():
        made[row["name"]] = int(row["rows"])
        done += int(row["rows"])
        if on_progress is not None:
            on_progress(done, total)
    missing = [s["name"] for s in shards if made.get(s["name"]) != len(s["captions"])]
    if missing:  # never expected: every shard is made or the job fails; the manifest must not lie
        raise SyntheticDataError(f"{display_uri(uri)}: shards not made: {', '.join(missing[:5])}")
    provenance = {k: v for k, v in plan.items() if k != "shards"}
    listed = [{"name": s["name"], "rows": len(s["captions"])} for s in shards]
    manifest = commit_manifest(fs, root, listed, {"dataset": "synthetic", "synthetic": provenance}, uri)
    try:
        fs.delete_file(posixpath.join(root, PLAN_NAME))
    except OSError:
        log.warning("%s: could not remove %s (readers ignore it)", display_uri(uri), PLAN_NAME)
    return manifest


# ---- a job in synthetic mode ---------------------------------------------------------------------------


def check_provenance(
    uri: str,
    teacher: str,
    *,
    options: StorageOptions | None = None,
    allow_other_teacher: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """The manifest of the synthetic set at ``uri``, checked against the job's ``teacher``; its
    ``synthetic.teacher_match`` set (true, false, or null when it cannot be told).

    Raises ``SyntheticDataError`` when there is no finished set there, when the set is not synthetic,
    or when another teacher made it (unless ``allow_other_teacher``: then ``warn`` is told).
    """
    shown = display_uri(uri)
    manifest = read_manifest(uri, options)
    if manifest is None:
        fs, root = resolve(uri, options)
        unfinished = _read_json(fs, posixpath.join(root, PLAN_NAME)) is not None
        raise SyntheticDataError(
            f"data.uri {shown}: data.mode is synthetic, but there is no finished shard set with a manifest"
            + (
                " (an unfinished synthetic set: run `addctl prepare-data synthetic` again to finish it)"
                if unfinished
                else "; make one with `addctl prepare-data synthetic`"
            )
        )
    provenance = manifest.get("synthetic")
    if not isinstance(provenance, dict) or not isinstance(provenance.get("teacher"), dict):
        kind = manifest.get("dataset") or manifest.get("source") or "real"
        raise SyntheticDataError(
            f"data.uri {shown}: data.mode is synthetic, but this shard set was not made by a teacher (its "
            f"manifest has no synthetic provenance: {kind} data); make one with `addctl prepare-data "
            "synthetic`, or set data.mode: real"
        )
    made_by = provenance["teacher"]
    theirs, ours = made_by.get("fingerprint"), _fingerprint(teacher)
    if theirs is not None and ours is not None:
        match = theirs == ours
    elif theirs is None and ours is None:
        match = made_by.get("source") == teacher  # two hub ids: the name is all there is
    else:
        match = None
    if match is False:
        message = (
            f"data.uri {shown}: this synthetic set was made by another teacher ({made_by.get('source')}, "
            f"fingerprint {str(theirs)[:12]}) than the job's ({teacher}, fingerprint {str(ours)[:12]})"
        )
        if not allow_other_teacher:
            raise SyntheticDataError(message + "; to train on it anyway set data.allow_other_teacher: true")
        (warn or log.warning)(message)
    return {**manifest, "synthetic": {**provenance, "teacher_match": match}}


_FINGERPRINTS: dict[tuple, str | None] = {}


def _fingerprint(source: str) -> str | None:
    """``teacher_fingerprint``, computed once per state of the folder (a job checks its data twice: when
    ``addctl run`` starts, before anything runs, and in the controller; an SD teacher is gigabytes)."""
    from workers.eval.table import teacher_fingerprint

    root = Path(source)
    if not root.is_dir():
        return None
    state = tuple(sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()))
    key = (str(root.resolve()), hash(state))
    if key not in _FINGERPRINTS:
        _FINGERPRINTS[key] = teacher_fingerprint(root)
    return _FINGERPRINTS[key]


def provenance_params(manifest: dict) -> dict[str, str]:
    """A synthetic set's provenance (``check_provenance``'s manifest) as flat MLflow params ``data.provenance.*``."""
    made = manifest["synthetic"]
    teacher, sampler = made.get("teacher", {}), made.get("sampler", {})
    return {
        "data.provenance.teacher": str(teacher.get("source")),
        "data.provenance.teacher_fingerprint": str(teacher.get("fingerprint")),
        "data.provenance.teacher_match": json.dumps(made.get("teacher_match")),
        "data.provenance.solver": str(sampler.get("solver")),
        "data.provenance.steps": str(sampler.get("steps")),
        "data.provenance.guidance_scale": str(sampler.get("guidance_scale")),
        "data.provenance.seed": str(made.get("seed")),
        "data.provenance.images_per_prompt": str(made.get("images_per_prompt")),
        "data.provenance.prompts": str(made.get("prompts")),
        "data.provenance.prompts_sha256": str(made.get("prompts_sha256")),
        "data.provenance.rows": str(manifest.get("rows")),
    }
