"""Writing image-caption Parquet shards that readers can trust: each one complete or absent.

Commit protocol (the same on every filesystem):

1. A shard is written under a temporary name in its final directory,
   ``_shard-00003.parquet.<random>.tmp``. Readers skip names starting with ``_`` or ``.``.
2. When the Parquet footer is written, the file is moved to ``shard-00003.parquet``. On a local
   filesystem that is an atomic rename; on S3 pyarrow's ``move`` is CopyObject then DeleteObject,
   and since an S3 object appears whole or not at all, a reader never sees a partial shard under
   its final key (at worst a leftover ``_...tmp`` key after a crash, which readers ignore).
   pyarrow may leave a zero-byte ``prefix/`` folder marker after the delete; readers ignore it.
3. When every shard is committed, ``_manifest.json`` is written the same way. It lists the
   committed shards with their row counts and is the dataset's completion marker: readers use
   the manifest's list when it exists (so shards left by an older, larger run are not mixed in),
   else every ``*.parquet`` under the URI.

Schema: ``image`` (binary: the original PNG/JPEG bytes, never re-encoded), ``caption`` (string),
``label`` (int64, null when unknown).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import posixpath
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    caption_for,
    eval_caption_templates,
    load_fashion_mnist,
    pad_image,
    png_bytes,
    train_caption_templates,
)
from .storage import (
    StorageError,
    StorageOptions,
    check_reachable,
    commit_bytes,
    display_uri,
    redact,
    resolve,
    split_uri,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "MANIFEST_NAME",
    "SHARD_SCHEMA",
    "ShardWriter",
    "commit_manifest",
    "commit_shard",
    "eval_caption_templates",
    "iter_image_folder",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "read_manifest",
    "train_caption_templates",
    "write_shards",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
SHARD_SCHEMA = pa.schema(
    [pa.field("image", pa.binary()), pa.field("caption", pa.string()), pa.field("label", pa.int64())]
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ShardWriter:
    """Buffers records and commits every ``rows_per_shard`` of them as one Parquet shard.

    Use as a context manager: on a clean exit the last partial shard and the manifest are
    committed; on an exception the pending rows are dropped and no manifest is written.
    """

    def __init__(
        self,
        uri: str,
        *,
        rows_per_shard: int = 5000,
        row_group_size: int = 1000,
        prefix: str = "shard",
        options: StorageOptions | None = None,
        metadata: dict | None = None,
    ):
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError("rows_per_shard and row_group_size must be positive")
        self.uri = uri
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.prefix = prefix
        self.metadata = dict(metadata or {})
        self.shards: list[dict] = []  # committed: {"name", "rows"}
        self.manifest: dict | None = None  # set by close()
        self._buffer: dict[str, list] = {"image": [], "caption": [], "label": []}
        check_reachable(uri, options, must_exist=False)
        self._fs, self._root = resolve(uri, options)
        if split_uri(uri)[0] == "file":
            self._fs.create_dir(self._root, recursive=True)

    def write(self, image: bytes, caption: str | None, label: int | None = None) -> None:
        """Add one record; commits a shard whenever ``rows_per_shard`` records are buffered."""
        self._buffer["image"].append(bytes(image))
        self._buffer["caption"].append(caption)
        self._buffer["label"].append(None if label is None else int(label))
        if len(self._buffer["image"]) >= self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        rows = len(self._buffer["image"])
        if rows == 0:
            return
        name = f"{self.prefix}-{len(self.shards):05d}.parquet"
        commit_shard(self._fs, self._root, name, self._buffer, self.uri, self.row_group_size)
        self.shards.append({"name": name, "rows": rows})
        self._buffer = {"image": [], "caption": [], "label": []}

    def close(self) -> dict:
        """Commit the last shard and the manifest; returns the manifest. Idempotent."""
        if self.manifest is not None:
            return self.manifest
        self._flush()
        self.manifest = commit_manifest(self._fs, self._root, self.shards, self.metadata, self.uri)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer = {"image": [], "caption": [], "label": []}


def commit_shard(
    fs: pafs.FileSystem, root: str, name: str, columns: dict[str, list], uri: str, row_group_size: int = 1000
) -> None:
    """Commit ``columns`` (``image``, ``caption``, ``label`` lists) as the shard ``root/name``, whole or not at all."""
    table = pa.table(columns, schema=SHARD_SCHEMA)
    try:
        commit_bytes(
            fs, posixpath.join(root, name), lambda out: pq.write_table(table, out, row_group_size=row_group_size)
        )
    except OSError as e:
        raise StorageError(f"{display_uri(uri)}: cannot write shard {name}: {redact(str(e))}") from None


def commit_manifest(fs: pafs.FileSystem, root: str, shards: list[dict], metadata: dict, uri: str) -> dict:
    """Commit ``_manifest.json`` listing ``shards`` (``{"name", "rows"}``, already committed): the set is
    then complete. Returns the manifest."""
    manifest = {
        "version": 1,
        "format": "parquet",
        "columns": SHARD_SCHEMA.names,
        "rows": sum(s["rows"] for s in shards),
        "shards": list(shards),
        **metadata,
    }
    data = json.dumps(manifest, indent=1).encode()
    try:
        commit_bytes(fs, posixpath.join(root, MANIFEST_NAME), lambda out: out.write(data))
    except OSError as e:
        raise StorageError(f"{display_uri(uri)}: cannot write {MANIFEST_NAME}: {redact(str(e))}") from None
    return manifest


def write_shards(
    records: Iterable[tuple[bytes, str | None, int | None]],
    uri: str,
    *,
    rows_per_shard: int = 5000,
    options: StorageOptions | None = None,
    metadata: dict | None = None,
) -> dict:
    """Write ``(image_bytes, caption, label)`` records as committed shards; returns the manifest."""
    with ShardWriter(uri, rows_per_shard=rows_per_shard, options=options, metadata=metadata) as writer:
        for image, caption, label in records:
            writer.write(image, caption, label)
    return writer.close()


def read_manifest(uri: str, options: StorageOptions | None = None) -> dict | None:
    """The dataset's ``_manifest.json`` as a dict, or None when there is none."""
    fs, root = resolve(uri, options)
    path = posixpath.join(root, MANIFEST_NAME)
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except OSError as e:
        raise StorageError(f"{display_uri(uri)}: cannot read {MANIFEST_NAME}: {redact(str(e))}") from None


# ---- preparation: image folder ------------------------------------------------------------------


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _caption_table(fs: pafs.FileSystem, root: str) -> dict[str, dict]:
    """``captions.csv`` or ``captions.jsonl`` at the folder root: relative path -> {caption, label}."""
    table: dict[str, dict] = {}
    csv_path, jsonl_path = posixpath.join(root, "captions.csv"), posixpath.join(root, "captions.jsonl")
    rows: list[dict] = []
    if fs.get_file_info(csv_path).type == pafs.FileType.File:
        rows += list(csv.DictReader(io.StringIO(_read_text(fs, csv_path))))
    if fs.get_file_info(jsonl_path).type == pafs.FileType.File:
        rows += [json.loads(line) for line in _read_text(fs, jsonl_path).splitlines() if line.strip()]
    for row in rows:
        key = row.get("file") or row.get("image") or row.get("path")
        if key:
            table[posixpath.normpath(str(key))] = row
    return table


def _label(value) -> int | None:
    return None if value in (None, "") else int(value)


def iter_image_folder(folder: str, options: StorageOptions | None = None):
    """Yield ``(relative_path, image_bytes, caption_or_None, label_or_None)`` for a captioned folder.

    Caption sources, first match wins: a row of ``captions.csv``/``captions.jsonl`` at the root
    (columns ``file``, ``caption``, optional ``label``; ``file`` relative to the folder), a sidecar
    ``<stem>.txt``, or a sidecar ``<stem>.json`` with ``caption`` (and optional ``label``).
    """
    fs, root = resolve(folder, options)
    table = _caption_table(fs, root)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = {posixpath.relpath(i.path, root): i for i in infos if i.type == pafs.FileType.File}
    for rel in sorted(r for r in files if r.lower().endswith(IMAGE_SUFFIXES)):
        stem = posixpath.splitext(rel)[0]
        caption, label = None, None
        if rel in table:
            caption, label = table[rel].get("caption"), _label(table[rel].get("label"))
        elif stem + ".txt" in files:
            caption = _read_text(fs, posixpath.join(root, stem + ".txt"))
        elif stem + ".json" in files:
            meta = json.loads(_read_text(fs, posixpath.join(root, stem + ".json")))
            caption, label = meta.get("caption"), _label(meta.get("label"))
        caption = caption.strip() if isinstance(caption, str) else None
        with fs.open_input_stream(posixpath.join(root, rel)) as f:
            yield rel, f.read(), caption or None, label


def prepare_image_folder(
    folder: str,
    uri: str,
    *,
    rows_per_shard: int = 5000,
    seed: int | None = 0,
    options: StorageOptions | None = None,
) -> dict:
    """Write a folder of captioned images as Parquet shards at ``uri``; returns the manifest.

    Images without a caption are left out and counted in the manifest (``skipped_no_caption``).
    With ``seed`` set, records are shuffled before sharding so every shard mixes the folder.
    """
    records = [(img, cap, lab) for _, img, cap, lab in iter_image_folder(folder, options)]
    kept = [r for r in records if r[1]]
    skipped = len(records) - len(kept)
    if skipped:
        log.warning("%s: %d image(s) without a caption left out", display_uri(folder), skipped)
    if seed is not None:
        kept = [kept[i] for i in np.random.default_rng(seed).permutation(len(kept))]
    meta = {"source": display_uri(folder), "skipped_no_caption": skipped}
    with ShardWriter(uri, rows_per_shard=rows_per_shard, options=options, metadata=meta) as writer:
        for image, caption, label in kept:
            writer.write(image, caption, label)
    return writer.close()


# ---- preparation: Fashion-MNIST -----------------------------------------------------------------


def prepare_fashion_mnist(
    idx_dir: str,
    uri: str,
    *,
    split: str = "train",
    templates: Iterable[str] | None = None,
    rows_per_shard: int = 10000,
    seed: int = 0,
    limit: int | None = None,
    size: int = 32,
    options: StorageOptions | None = None,
) -> dict:
    """Write one Fashion-MNIST split as Parquet shards (PNG padded to ``size``, caption, label).

    Each image gets one caption from ``templates``, drawn with ``seed``; by default the training
    templates for "train" and the held-out evaluation templates for "test".
    """
    images, labels = load_fashion_mnist(idx_dir, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    templates = tuple(templates or (train_caption_templates if split == "train" else eval_caption_templates))
    choice = np.random.default_rng(seed).integers(len(templates), size=len(labels))
    meta = {
        "dataset": "fashion-mnist",
        "split": split,
        "size": size,
        "classes": list(FASHION_MNIST_CLASSES),
        "templates": list(templates),
    }
    with ShardWriter(uri, rows_per_shard=rows_per_shard, options=options, metadata=meta) as writer:
        for image, label, t in zip(images, labels, choice, strict=True):
            writer.write(png_bytes(pad_image(image, size)), caption_for(int(label), templates[t]), int(label))
    return writer.close()
