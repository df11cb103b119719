"""Reference (real) images for the Fréchet distance, read from an image-caption Parquet dataset."""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from workers.data.ingest import decode_image, list_shards
from workers.data.storage import StorageOptions, resolve


def reference_images(
    uri: str,
    count: int,
    resolution: int,
    channels: int = 3,
    storage: StorageOptions | None = None,
    image_column: str = "image",
) -> Tensor:
    """The first ``count`` decodable images of the shards at ``uri`` (in shard order), (N, C, H, W) in [0, 1]."""
    fs, root = resolve(uri, storage)
    images: list[np.ndarray] = []
    for name in list_shards(uri, "parquet", storage):
        path = posixpath.join(root, name) if name else root
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=256, columns=[image_column]):
            for data in batch.column(0).to_pylist():
                data = data.get("bytes") if isinstance(data, dict) else data
                try:
                    images.append(decode_image(data, resolution, channels, min_side=1))
                except (ValueError, TypeError):
                    continue  # bad records are the ingest's business; skip them here
                if len(images) == count:
                    return (torch.from_numpy(np.stack(images)) + 1) / 2
    if len(images) < 2:
        raise ValueError(f"{uri}: fewer than 2 decodable images for the Fréchet distance")
    return (torch.from_numpy(np.stack(images)) + 1) / 2
