"""The job file's ``data`` and ``storage`` sections: where shards are read from and how they are
decoded (``workers.data.ingest``), where checkpoints and exports go (``workers.train.trainer``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from workers.config import Section, Seed
from workers.data.storage import StorageUri, check_storage_options, scalars_as_strings


class ShardsSpec(Section):
    """Where image-caption shards are read from: their URI and the options of that storage."""

    uri: StorageUri = Field(description="shards: s3://bucket/prefix, file:///path, gs://..., or a local path")
    storage_options: dict[str, str] = Field(
        default_factory=dict,
        description="endpoint_url, region, profile, anonymous, timeouts, max_attempts; values may be ${env:NAME}",
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _unquoted(cls, v):
        return scalars_as_strings(v)

    @field_validator("storage_options")
    @classmethod
    def _options(cls, v):
        return check_storage_options(v, "data.storage_options")


class DataSpec(ShardsSpec):
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
    options: dict[str, str] = Field(
        default_factory=dict, description="options of the storage (as data.storage_options); values may be ${env:NAME}"
    )

    @field_validator("options", mode="before")
    @classmethod
    def _unquoted(cls, v):
        return scalars_as_strings(v)

    @field_validator("options")
    @classmethod
    def _options(cls, v):
        return check_storage_options(v, "storage.options")
