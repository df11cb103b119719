"""The job file's ``data`` and ``storage`` sections: where shards are read from and how they are
decoded (``workers.data.ingest``), whether they are real or the teacher's own samples
(``workers.data.synthetic``), where checkpoints and exports go (``workers.train.trainer``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.config import Section, Seed
from workers.data.storage import StorageOptionsMap, StorageUri


class ShardsSpec(Section):
    """Where image-caption shards are read from: their URI and the options of that storage."""

    uri: StorageUri = Field(description="shards: s3://bucket/prefix, file:///path, gs://..., or a local path")
    storage_options: StorageOptionsMap("data.storage_options") = Field(
        default_factory=dict,
        description="endpoint_url, region, profile, anonymous, timeouts, max_attempts; values may be ${env:NAME}",
    )


class DataSpec(ShardsSpec):
    mode: Literal["real", "synthetic"] = Field(
        "real",
        description="real: a dataset's images; synthetic: the teacher's own samples, made by `addctl prepare-data "
        "synthetic` (LADD; the set's manifest must name its teacher, and loss.lambda_distill may be 0)",
    )
    allow_other_teacher: bool = Field(
        False, description="synthetic: train on a set another teacher made (a warning instead of an error)"
    )
    format: Literal["parquet", "webdataset"] = Field("parquet", description="shard format")
    resolution: int = Field(32, ge=8, description="images are resized and centre-cropped to this size")
    channels: Literal[1, 3] = Field(3, description="image channels the model takes")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="fail when more records than this are bad")
    shuffle_seed: Seed = Field(0, description="seed of the per-epoch file and local shuffles")
    local_shuffle_buffer: int = Field(256, ge=0, description="rows in Ray Data's local shuffle buffer")
    embed_captions: bool = Field(
        False, description="encode captions in Ray Data (an actor pool, on GPUs if any), not on the training workers"
    )


class StorageSpec(Section):
    uri: StorageUri = Field("runs", description="where checkpoints and exports go: a local folder or s3://bucket/prefix")
    options: StorageOptionsMap("storage.options") = Field(
        default_factory=dict, description="options of the storage (as data.storage_options); values may be ${env:NAME}"
    )
