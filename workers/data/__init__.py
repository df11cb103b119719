"""Data for ADD training: storage access, Parquet shard preparation and the streaming Ray Data ingest.

- ``storage``: URI -> pyarrow filesystem (s3://, gs://, file://, local), reachability checks.
- ``shards``: atomic Parquet shard writing; preparation from an image folder or Fashion-MNIST.
- ``fashion_mnist``: idx files, class names, training and held-out caption templates.
- ``ingest``: ``build_dataset`` (decode, resize, crop, normalise, bad-record accounting) and
  ``CaptionEmbedder``/``embed_captions`` (text encoder in an actor pool).

``ingest`` imports Ray; import it explicitly (``from workers.data.ingest import build_dataset``).
"""

from .fashion_mnist import FASHION_MNIST_CLASSES, eval_caption_templates, train_caption_templates
from .shards import ShardWriter, prepare_fashion_mnist, prepare_image_folder, read_manifest, write_shards
from .storage import StorageError, StorageOptions, check_reachable, resolve

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ShardWriter",
    "StorageError",
    "StorageOptions",
    "check_reachable",
    "eval_caption_templates",
    "prepare_fashion_mnist",
    "prepare_image_folder",
    "read_manifest",
    "resolve",
    "train_caption_templates",
    "write_shards",
]
