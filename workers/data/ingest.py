"""Streaming Ray Data ingest: image-caption shards -> normalised pixels, captions, text embeddings.

Pipeline, nothing materialised::

    from_items(shards in a (seed, epoch) permutation)         file-level shuffle
      -> map_batches(_read_shards, batch_size=1)              one CPU task per shard: stream its
             records through a shuffle buffer seeded by (seed, epoch, shard), decode, resize,
             centre-crop, normalise to [-1, 1], skip and count bad records
      -> map_batches(CaptionEmbedder, concurrency=n)          optional (``embed_captions``): an
             actor pool holding the text encoder, on GPUs when the cluster has them
      -> Ray Train's DataConfig splits it across the training workers (streaming_split)

Output columns: ``pixels`` float32 (C, H, W) in [-1, 1]; ``caption`` str; ``label`` int64 (-1
when unknown); ``key`` str (``shard-name:record``, for debugging and resume checks); ``epoch``
int64. ``num_epochs > 1`` chains several epochs, each with its own seeded order, into one pass.

Bad records (undecodable or truncated image, no caption, image smaller than ``min_side``) and
how they are counted across Ray tasks:

- A shard is read by exactly one task, start to end, so that task holds the exact count for its
  shard: no cross-task aggregation is needed to decide. For Parquet the shard's row count is in
  its footer, so the task fails as soon as ``bad > max_bad_fraction * rows`` (fail fast); for a
  tar shard the total is known at its end and the check runs there. The task raises
  ``BadRecordsError`` naming the shard; Ray Data fails the pipeline and the training loop's
  iterator re-raises it, so the run fails with that message.
- For metrics the task reports ``(epoch, shard) -> (good, bad)`` to a small named actor, the
  ``RecordLedger`` (0 CPUs), every few batches and at the shard's end. Reports carry running
  totals and the ledger keeps the maximum per key, so a retried task or a second iteration of the
  same dataset never double-counts. ``data_metrics()`` reads ``data/bad_records`` from it on any
  process of the job (named actors are per job namespace).
- A shard that cannot be opened or parsed at all (a corrupt Parquet footer, random bytes) counts
  every one of its rows as bad (from the manifest; unknown without one), so it fails the run
  (``ShardReadError``) unless ``max_bad_fraction`` is 1, when it is skipped and its rows are
  reported lost. Records after a truncation point of a tar file cannot be seen: not counted.
- A data failure is decided here, once: before raising, the task records it in the ledger as
  the run's fatal data error. A retry cannot mend the data, so a restarted training attempt reads
  it and ends at once (``workers.train.trainer``), instead of finishing on the other shards.
- ``RecordLedger.report()`` is what the run's summary and MLflow get: rows read, bad rows, and per
  shard the rows lost (the most seen in any one epoch) with the first reason.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from PIL import Image
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .shards import read_manifest
from .storage import StorageError, StorageOptions, check_reachable, display_uri, join_uri, redact, resolve

__all__ = [
    "DEFAULT_LEDGER",
    "BadRecordsError",
    "CaptionEmbedder",
    "DecodeConfig",
    "RecordLedger",
    "ShardReadError",
    "build_dataset",
    "close_ledger",
    "data_failure",
    "data_metrics",
    "data_report",
    "decode_image",
    "embed_captions",
    "list_shards",
    "record_ledger",
    "shard_order",
]

log = logging.getLogger(__name__)

DEFAULT_LEDGER = "add-data-record-ledger"
FORMATS = {"parquet": (".parquet",), "webdataset": (".tar", ".tar.gz", ".tgz")}
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_REPORT_EVERY = 8  # batches between ledger reports
_MAX_REASONS = 5  # bad-record reasons quoted in the error


class BadRecordsError(ValueError):
    """A shard holds more bad records than ``max_bad_fraction`` allows; the message names it."""


class ShardReadError(OSError):
    """A shard cannot be opened or parsed at all; the message names it."""


@dataclass(frozen=True)
class DecodeConfig:
    """What one shard task needs to turn records into training rows."""

    format: str = "parquet"  # "parquet" or "webdataset"
    resolution: int = 32  # output side (square)
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    min_side: int | None = None  # smaller images are bad records; None: ``resolution``
    max_bad_fraction: float = 0.01  # per shard; above it the run fails
    shuffle_buffer: int = 1000  # records in the seeded in-shard shuffle buffer; <= 1 disables
    batch_size: int = 256  # rows per yielded block
    image_column: str = "image"  # Parquet: binary, or a struct with a "bytes" field
    caption_column: str = "caption"
    label_column: str = "label"  # optional in the data
    seed: int = 0
    ledger: str | None = DEFAULT_LEDGER  # named RecordLedger actor; None: no metrics


# ---- the bad-record ledger ----------------------------------------------------------------------


@ray.remote(num_cpus=0)
class RecordLedger:
    """Good/bad record counts per (epoch, shard); reports are running totals, merged by maximum."""

    def __init__(self):
        self._counts: dict[tuple[int, str], list[int]] = {}
        self._reasons: dict[str, str] = {}  # shard -> its first problem
        self._fatal: str | None = None

    def record(self, epoch: int, shard: str, good: int, bad: int, reason: str | None = None) -> None:
        counts = self._counts.setdefault((epoch, shard), [0, 0])
        counts[0], counts[1] = max(counts[0], good), max(counts[1], bad)
        if reason and shard not in self._reasons:
            self._reasons[shard] = reason

    def fail(self, message: str) -> None:
        """The run's data failed (the first message stays): no attempt may train on."""
        self._fatal = self._fatal or message

    def fatal(self) -> str | None:
        return self._fatal

    def report(self) -> dict:
        """Rows read and bad over the run, and the shards that lost rows: ``{shard: {rows, reason}}``."""
        lost: dict[str, int] = {}
        for (_, shard), (_, bad) in self._counts.items():
            if bad:
                lost[shard] = max(lost.get(shard, 0), bad)
        return {
            "records": sum(g for g, _ in self._counts.values()),
            "bad_records": sum(b for _, b in self._counts.values()),
            "lost_rows": sum(lost.values()),
            "lost": {s: {"rows": n, "reason": self._reasons.get(s, "")} for s, n in sorted(lost.items())},
            "fatal": self._fatal,
        }

    def per_shard(self, epoch: int | None = None) -> dict[str, tuple[int, int]]:
        return {f"{e}:{s}": (g, b) for (e, s), (g, b) in self._counts.items() if epoch is None or e == epoch}

    def totals(self, epoch: int | None = None) -> dict[str, int]:
        rows = [c for (e, _), c in self._counts.items() if epoch is None or e == epoch]
        return {
            "records": sum(g for g, _ in rows),
            "bad_records": sum(b for _, b in rows),
            "shards": len(rows),
        }


_LEDGER_HANDLES: dict = {}


def record_ledger(name: str = DEFAULT_LEDGER):
    """The job's ``RecordLedger`` actor of that name, created on first use."""
    try:
        return ray.get_actor(name)
    except ValueError:
        pass
    # A (non-detached) named actor dies when its creating handle goes: this process keeps it. It lives
    # on this process's node, so losing another node (a training worker's) does not lose the counts.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    handle = RecordLedger.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()
    _LEDGER_HANDLES[name] = handle
    return handle


def close_ledger(name: str) -> None:
    """End the named ledger (its run is over): ledgers are per run and would pile up in a long driver."""
    handle = _LEDGER_HANDLES.pop(name, None)
    if handle is None:
        try:
            handle = ray.get_actor(name)
        except ValueError:
            return
    ray.kill(handle)


def data_report(name: str = DEFAULT_LEDGER) -> dict:
    """``RecordLedger.report()`` of the named ledger (empty counts when there is none)."""
    try:
        return ray.get(ray.get_actor(name).report.remote())
    except ValueError:
        return {"records": 0, "bad_records": 0, "lost_rows": 0, "lost": {}, "fatal": None}


def data_failure(name: str = DEFAULT_LEDGER) -> str | None:
    """The run's fatal data error recorded in the named ledger, or None."""
    try:
        return ray.get(ray.get_actor(name).fatal.remote())
    except ValueError:
        return None


def data_metrics(name: str = DEFAULT_LEDGER, epoch: int | None = None) -> dict[str, float]:
    """``data/records``, ``data/bad_records`` and ``data/bad_fraction`` seen so far (or for one epoch)."""
    t = ray.get(record_ledger(name).totals.remote(epoch))
    seen = t["records"] + t["bad_records"]
    return {
        "data/records": t["records"],
        "data/bad_records": t["bad_records"],
        "data/bad_fraction": t["bad_records"] / seen if seen else 0.0,
    }


# ---- shard listing and order --------------------------------------------------------------------


def list_shards(uri: str, format: str = "parquet", storage: StorageOptions | None = None) -> list[str]:
    """Shard names relative to ``uri`` (a folder/prefix, or a single shard file), sorted.

    Parquet datasets with a ``_manifest.json`` (see ``shards.py``) use its list of committed shards.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    check_reachable(uri, storage)
    fs, root = resolve(uri, storage)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            return [""]
        manifest = read_manifest(uri, storage) if format == "parquet" else None
        if manifest is not None:
            names = [s["name"] for s in manifest["shards"]]
        else:
            selector = pafs.FileSelector(root, recursive=True)
            names = sorted(
                posixpath.relpath(i.path, root)
                for i in fs.get_file_info(selector)
                if i.type == pafs.FileType.File
                and i.base_name.endswith(FORMATS[format])
                and not i.base_name.startswith(("_", "."))
            )
    except StorageError:
        raise
    except Exception as e:
        raise StorageError(f"{display_uri(uri)}: cannot list shards: {redact(str(e))}") from None
    if not names:
        raise StorageError(f"{display_uri(uri)}: no {format} shards ({'/'.join(FORMATS[format])}) found")
    return names


def shard_order(names: list[str], seed: int, epoch: int) -> list[str]:
    """The file-level shuffle: a permutation of ``names`` that depends only on (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    return [names[i] for i in rng.permutation(len(names))]


# ---- record sources -----------------------------------------------------------------------------
# Each yields (key, image_bytes | None, caption | None, label | None, problem | None).


def _parquet_records(fs: pafs.FileSystem, path: str, cfg: DecodeConfig, state: dict) -> Iterator[tuple]:
    pf = pq.ParquetFile(fs.open_input_file(path))
    state["total"] = pf.metadata.num_rows
    names = pf.schema_arrow.names
    for column in (cfg.image_column, cfg.caption_column):
        if column not in names:
            raise ValueError(f"no column {column!r} (columns: {names})")
    columns = [cfg.image_column, cfg.caption_column] + (
        [cfg.label_column] if cfg.label_column in names else []
    )
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        data = batch.to_pydict()
        images, captions = data[cfg.image_column], data[cfg.caption_column]
        labels = data.get(cfg.label_column, [None] * len(images))
        for image, caption, label in zip(images, captions, labels, strict=True):
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                image = image.get("bytes")
            yield str(row), image, caption, label, None
            row += 1


def _tar_records(fs: pafs.FileSystem, path: str, cfg: DecodeConfig, state: dict) -> Iterator[tuple]:
    """WebDataset samples: consecutive members sharing a key (name up to the first dot)."""
    key, sample = None, {}
    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, base = posixpath.split(member.name)
                if base.startswith(".") or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                member_key = posixpath.join(dirname, stem)
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(key, sample)
                    key, sample = member_key, {}
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        # A truncated or corrupt tar: the sample being read is bad; what follows is unreachable.
        if key is None and not sample:
            raise
        yield key or "?", None, None, None, f"truncated tar ({e})"
        return
    if key is not None:
        yield _tar_sample(key, sample)


def _tar_sample(key: str, sample: dict[str, bytes]) -> tuple:
    image = next((sample[e] for e in _IMAGE_EXTS if e in sample), None)
    caption, label = None, None
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace")
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
            caption = caption if caption is not None else meta.get("caption")
            label = meta.get("label")
        except ValueError:
            pass
    if "cls" in sample and label is None:
        label = sample["cls"].decode().strip()
    try:
        label = None if label in (None, "") else int(label)
    except (TypeError, ValueError):
        label = None
    return key, image, caption, label, None


def _shuffled(records: Iterator[tuple], size: int, rng: np.random.Generator) -> Iterator[tuple]:
    """A seeded shuffle buffer: each record leaves at a random point among the next ``size``."""
    if size <= 1:
        yield from records
        return
    buffer: list[tuple] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = record
    for i in rng.permutation(len(buffer)):
        yield buffer[i]


# ---- decoding -----------------------------------------------------------------------------------


def decode_image(data: bytes, resolution: int, channels: int, min_side: int) -> np.ndarray:
    """Bytes -> float32 (C, resolution, resolution) in [-1, 1]: shorter side resized, centre crop.

    Raises ``ValueError`` for an image that cannot be decoded or is smaller than ``min_side``.
    """
    mode = {1: "L", 3: "RGB"}[channels]
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if min(w, h) < min_side:
            raise ValueError(f"image {w}x{h} is smaller than min_side={min_side}")
        img.draft(mode, (resolution, resolution))  # JPEG: decode directly at a reduced scale
        img = img.convert(mode)  # forces the full decode: truncated data fails here
    except ValueError:
        raise
    except Exception as e:
        reason = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "data", str(e))  # no object addresses in messages
        raise ValueError(f"cannot decode image: {reason}") from None
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1.0:
        w, h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    pixels = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def _read_shards(batch: dict[str, np.ndarray], *, fs: pafs.FileSystem, cfg: DecodeConfig) -> Iterator[dict]:
    """Map-batches UDF: one input row per shard -> decoded output batches (a generator)."""
    rows = batch["rows"] if "rows" in batch else [-1] * len(batch["path"])
    for path, uri, name, epoch, n in zip(batch["path"], batch["uri"], batch["name"], batch["epoch"], rows, strict=True):
        yield from _read_one_shard(fs, str(path), str(uri), str(name), int(epoch), cfg, int(n))


def _read_one_shard(
    fs, path: str, uri: str, name: str, epoch: int, cfg: DecodeConfig, rows_known: int = -1
) -> Iterator[dict]:
    """Decoded batches of one shard; ``rows_known``: its row count from the manifest (-1: unknown)."""
    ledger = None
    if cfg.ledger:
        try:
            ledger = ray.get_actor(cfg.ledger)
        except ValueError:
            log.warning("record ledger %r not found: data/bad_records will not include %s", cfg.ledger, uri)
    source = _parquet_records if cfg.format == "parquet" else _tar_records
    state: dict = {"total": None}  # set by the source when it knows the shard's size up front
    rng = np.random.default_rng([cfg.seed, epoch, zlib.crc32(name.encode())])
    min_side = cfg.resolution if cfg.min_side is None else cfg.min_side
    good = bad = 0
    reasons: list[str] = []
    rows: dict[str, list] = {"pixels": [], "caption": [], "label": [], "key": []}
    batches = 0

    def report(wait: bool = False, fatal: str | None = None) -> None:
        if ledger is None:
            return
        try:
            ref = ledger.record.remote(epoch, uri, good, bad, reasons[0] if reasons else None)
            if fatal:
                ref = ledger.fail.remote(fatal)
            if wait or fatal:  # the final count (and the failure) is in the ledger before anything else is out
                ray.get(ref)
        except Exception as e:  # metrics must never fail the run
            log.warning("record ledger unavailable (%s): counts of %s not recorded", type(e).__name__, uri)

    def check(total: int | None, final: bool) -> None:
        total = total if total is not None else (good + bad if final else None)
        if total is None or bad <= cfg.max_bad_fraction * total:
            return
        shown = "; ".join(reasons)
        message = (
            f"shard {uri}: {bad} of {total} records are bad ({bad / total:.1%}), more than "
            f"max_bad_fraction={cfg.max_bad_fraction:.1%}; first problems: {shown}"
        )
        report(wait=True, fatal=message)
        raise BadRecordsError(message)

    def emit() -> dict:
        out = {
            "pixels": np.stack(rows["pixels"]).astype(np.float32, copy=False),
            "caption": np.array(rows["caption"], dtype=object),
            "label": np.array(rows["label"], dtype=np.int64),
            "key": np.array(rows["key"], dtype=object),
            "epoch": np.full(len(rows["key"]), epoch, dtype=np.int64),
        }
        for column in rows.values():
            column.clear()
        return out

    try:
        records = _shuffled(source(fs, path, cfg, state), cfg.shuffle_buffer, rng)
        for key, image, caption, label, problem in records:
            if problem is None:
                if not image:
                    problem = "no image"
                elif not isinstance(caption, str) or not caption.strip():
                    problem = "missing caption"
                else:
                    try:
                        rows["pixels"].append(decode_image(image, cfg.resolution, cfg.channels, min_side))
                    except ValueError as e:
                        problem = str(e)
            if problem is not None:
                bad += 1
                if len(reasons) < _MAX_REASONS:
                    reasons.append(f"record {key}: {problem}")
                check(state["total"], final=False)
                continue
            good += 1
            rows["caption"].append(caption.strip())
            rows["label"].append(-1 if label is None else int(label))
            rows["key"].append(f"{name}:{key}")
            if len(rows["key"]) >= cfg.batch_size:
                yield emit()
                batches += 1
                if batches % _REPORT_EVERY == 0:
                    report()
    except BadRecordsError:
        raise
    except Exception as e:
        # Unreadable as a whole: every row it holds is bad (the rows already read stay counted good).
        reason = f"cannot read: {redact(str(e))}"
        total = state["total"] if state["total"] is not None else (rows_known if rows_known >= 0 else None)
        bad = max(bad, (total - good) if total is not None else 1)
        reasons.insert(0, reason)
        if cfg.max_bad_fraction >= 1.0:  # every loss allowed: skip the shard, its rows reported lost
            log.warning("shard %s: %s; its %s rows are skipped", uri, reason, total if total is not None else "?")
            report(wait=True)
            return
        rows_text = f"all {total} rows" if total is not None else "all its rows (count unknown: no manifest)"
        message = (
            f"shard {uri}: {reason}; {rows_text} lost, more than max_bad_fraction={cfg.max_bad_fraction:.1%} "
            "(a retry cannot mend the data: replace the shard, or remove it from the manifest)"
        )
        report(wait=True, fatal=message)
        raise ShardReadError(message) from None
    check(state["total"], final=True)
    report(wait=True)
    if rows["key"]:
        yield emit()


def build_dataset(
    uri: str,
    *,
    format: str = "parquet",
    resolution: int = 32,
    channels: int = 3,
    seed: int = 0,
    epoch: int = 0,
    num_epochs: int = 1,
    shuffle_files: bool = True,
    shuffle_buffer: int = 1000,
    max_bad_fraction: float = 0.01,
    min_side: int | None = None,
    batch_size: int = 256,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str = "label",
    storage: StorageOptions | None = None,
    ledger: str | None = DEFAULT_LEDGER,
    preserve_order: bool = False,
    num_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A lazy, streaming dataset of decoded training rows for epochs ``[epoch, epoch + num_epochs)``.

    Fails here, with a ``StorageError`` naming ``uri``, when the storage is unreachable, the
    bucket is wrong or no shard is found. Bad records fail the run later, while streaming (see
    the module docstring). ``preserve_order=True`` makes the row order a pure function of
    (seed, epoch); Ray Train applies its own ``DataConfig(execution_options=...)`` to datasets it
    splits, so set it there too.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    names = list_shards(uri, format, storage)
    fs, root = resolve(uri, storage)
    cfg = DecodeConfig(
        format=format,
        resolution=resolution,
        channels=channels,
        min_side=min_side,
        max_bad_fraction=max_bad_fraction,
        shuffle_buffer=shuffle_buffer,
        batch_size=batch_size,
        image_column=image_column,
        caption_column=caption_column,
        label_column=label_column,
        seed=seed,
        ledger=ledger,
    )
    if ledger:
        record_ledger(ledger)
    manifest = read_manifest(uri, storage) if format == "parquet" and names != [""] else None
    rows = {s["name"]: int(s.get("rows", -1)) for s in (manifest or {}).get("shards", [])}
    items = []
    for e in range(epoch, epoch + num_epochs):
        for name in shard_order(names, seed, e) if shuffle_files else names:
            shard_uri = display_uri(join_uri(uri, name)) if name else display_uri(uri)
            path = posixpath.join(root, name) if name else root
            items.append(
                {
                    "path": path,
                    "uri": shard_uri,
                    "name": name or posixpath.basename(root),
                    "epoch": e,
                    "rows": rows.get(name, -1),
                }
            )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_read_shards, batch_size=1, fn_kwargs={"fs": fs, "cfg": cfg}, num_cpus=num_cpus)
    options = copy.deepcopy(ds.context.execution_options)  # never mutate a shared/global one
    options.preserve_order = preserve_order
    ds.context.execution_options = options
    return ds


# ---- caption embeddings -------------------------------------------------------------------------


class CaptionEmbedder:
    """Map-batches callable class: captions -> text-embedding column(s), one encoder per actor.

    ``encoder_factory()`` builds the encoder once per actor; its ``encode(list[str])`` returns a
    tensor-like (B, ...) stored as ``output_column``, or a mapping/dataclass of them, stored as
    ``f"{output_column}_{field}"`` (None fields dropped). Each actor keeps the embeddings of up to
    ``cache_size`` distinct captions, so template-captioned data (Fashion-MNIST: 80 captions) is
    encoded once per caption, not once per row.
    """

    def __init__(
        self,
        encoder_factory: Callable[[], object],
        *,
        caption_column: str = "caption",
        output_column: str = "text_embedding",
        device: str = "auto",
        dtype: str = "float32",
        cache_size: int = 100_000,
    ):
        import torch

        self._torch = torch
        self.encoder = encoder_factory()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if hasattr(self.encoder, "to"):
            self.encoder = self.encoder.to(device) or self.encoder
        self.caption_column = caption_column
        self.output_column = output_column
        self.dtype = np.dtype(dtype)
        self.cache_size = cache_size
        self._cache: dict[str, dict[str, np.ndarray]] = {}  # caption -> {column: row}, insertion-ordered

    def _encode(self, captions: list[str]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.encoder.encode(captions)
        if dataclasses.is_dataclass(out) and not isinstance(out, type):
            out = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        if isinstance(out, Mapping):
            return {
                f"{self.output_column}_{k}": self._to_numpy(v, len(captions))
                for k, v in out.items()
                if v is not None
            }
        return {self.output_column: self._to_numpy(out, len(captions))}

    def _to_numpy(self, value, rows: int) -> np.ndarray:
        if hasattr(value, "detach"):  # torch.Tensor, bf16 included
            value = value.detach().float().cpu().numpy()
        array = np.asarray(value).astype(self.dtype, copy=False)
        if array.shape[:1] != (rows,):
            raise ValueError(f"encoder returned shape {array.shape} for {rows} captions")
        return array

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        captions = [str(c) for c in batch[self.caption_column]]
        if self.cache_size <= 0:
            batch.update(self._encode(captions))
            return batch
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            encoded = self._encode(missing)
            for i, caption in enumerate(missing):
                self._cache[caption] = {k: v[i] for k, v in encoded.items()}
        rows = [self._cache[c] for c in captions]
        for column in rows[0]:
            batch[column] = np.stack([r[column] for r in rows])
        while len(self._cache) > self.cache_size:  # evict the oldest entries
            del self._cache[next(iter(self._cache))]
        return batch


def embed_captions(
    ds: ray.data.Dataset,
    encoder_factory: Callable[[], object],
    *,
    concurrency: int = 1,
    batch_size: int = 256,
    num_gpus: float | None = None,
    caption_column: str = "caption",
    output_column: str = "text_embedding",
    dtype: str = "float32",
) -> ray.data.Dataset:
    """Add text embeddings through an actor pool of ``CaptionEmbedder`` (on GPUs when there are any).

    ``num_gpus=None`` asks for one GPU per actor when the cluster has GPUs, else none.
    ``encoder_factory`` must be picklable (a module-level function or ``functools.partial``).
    """
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return ds.map_batches(
        CaptionEmbedder,
        fn_constructor_args=(encoder_factory,),
        fn_constructor_kwargs={
            "caption_column": caption_column,
            "output_column": output_column,
            "dtype": dtype,
        },
        batch_size=batch_size,
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=None if num_gpus else 1,
    )
