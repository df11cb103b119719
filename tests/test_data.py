"""Data: storage resolution and errors, atomic Parquet shards, dataset preparation, the Ray Data ingest."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from workers.data import shards as shards_module
from workers.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    caption_for,
    eval_caption_templates,
    eval_prompts,
    read_idx,
    train_caption_templates,
)
from workers.data.shards import (
    MANIFEST_NAME,
    ShardWriter,
    prepare_fashion_mnist,
    prepare_image_folder,
    read_manifest,
    write_shards,
)
from workers.data.storage import (
    StorageError,
    StorageOptions,
    check_reachable,
    display_uri,
    redact,
    resolve,
    split_uri,
)

# The S3 fixtures, until tests/conftest.py imports them for every module.

# ---- helpers ------------------------------------------------------------------------------------


def png(value: int, size: int = 32, mode: str = "L") -> bytes:
    shape = (size, size) if mode == "L" else (size, size, 3)
    buf = io.BytesIO()
    Image.fromarray(np.full(shape, value % 256, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(value: int, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def tiny_fashion_mnist(
    folder, n_train: int = 23, n_test: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n, ext in (("train", "train", n_train, ".gz"), ("test", "t10k", n_test, "")):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = (images, labels)
    return out


def tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def bad_parquet_records(n: int = 40) -> list[tuple[bytes, str | None, int]]:
    """``n`` records with 2 truncated images, 1 missing caption, 1 empty caption and 1 too-small image."""
    records = [(png(i), f"caption {i}", i % 10) for i in range(n)]
    records[3] = (png(3)[:60], "truncated png", 3)
    records[11] = (jpeg(11)[:100], "truncated jpeg", 1)
    records[17] = (png(17), None, 7)
    records[23] = (png(23), "   ", 3)
    records[29] = (png(29, size=16), "too small", 9)
    return records


# ---- storage ------------------------------------------------------------------------------------


def test_split_uri_local_file_and_s3(tmp_path):
    assert split_uri(str(tmp_path)) == ("file", str(tmp_path))
    assert split_uri(f"file://{tmp_path}/x") == ("file", f"{tmp_path}/x")
    assert split_uri("s3://bucket/a/b/") == ("s3", "bucket/a/b")
    assert split_uri("s3://AKIDX:s3cr3t@bucket/a") == ("s3", "bucket/a")
    assert display_uri("s3://AKIDX:s3cr3t@bucket/a") == "s3://bucket/a"
    fs, path = resolve(f"file://{tmp_path}")
    assert type(fs).__name__ == "LocalFileSystem" and path == str(tmp_path)
    with pytest.raises(StorageError, match="nothing found"):
        check_reachable(str(tmp_path / "missing"))


def test_s3_endpoint_and_credentials_come_from_environment(s3_server, monkeypatch):
    s3_server.create_bucket("envbucket")
    # AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL (pointed at a closed port here).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = resolve("s3://envbucket/data")
    assert path == "envbucket/data"
    with fs.open_output_stream("envbucket/data/hello.txt") as f:
        f.write(b"hi")
    assert s3_server.keys("envbucket") == ["data/hello.txt"]
    check_reachable("s3://envbucket/data")


def test_s3_credentials_from_a_named_profile(s3_server, monkeypatch, tmp_path):
    s3_server.create_bucket("profbucket")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    (tmp_path / "credentials").write_text(
        f"[lab]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    (tmp_path / "config").write_text("[profile lab]\nregion = eu-west-1\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    fs, _ = resolve("s3://profbucket", StorageOptions(profile="lab"))
    assert fs.region == "eu-west-1"
    check_reachable("s3://profbucket", StorageOptions(profile="lab"), must_exist=False)
    with pytest.raises(StorageError, match="profile 'nope' not found"):
        resolve("s3://profbucket", StorageOptions(profile="nope"))


def test_gs_without_its_package_is_a_clear_error():
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(StorageError, match=r"gs://bucket/x: gs:// needs the gcsfs package"):
            resolve("gs://bucket/x")
    else:
        pytest.skip("gcsfs is installed")


def _assert_no_secret(text: str, server) -> None:
    assert server.secret_key not in text
    assert server.access_key not in text


def test_wrong_bucket_is_a_clear_error_without_secrets(s3_server, caplog):
    caplog.set_level(logging.INFO)
    uri = "s3://no-such-bucket/datasets/fm"
    with pytest.raises(StorageError) as err:
        check_reachable(uri)
    assert uri in str(err.value) and "does not exist" in str(err.value)
    from workers.data.ingest import build_dataset

    with pytest.raises(StorageError, match="s3://no-such-bucket/datasets/fm"):
        build_dataset(uri)
    with pytest.raises(StorageError, match="no-such-bucket"):
        write_shards([(png(0), "x", 0)], uri)
    _assert_no_secret(str(err.value) + caplog.text, s3_server)


def test_unreachable_endpoint_is_a_clear_error_without_secrets(s3_server, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # nothing listens there
    uri = f"s3://{s3_server.access_key}:{s3_server.secret_key}@somebucket/prefix"
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_reachable(uri, StorageOptions(connect_timeout=1, max_attempts=1))
    message = str(err.value)
    assert time.monotonic() - start < 30
    assert message.startswith("s3://somebucket/prefix (endpoint http://127.0.0.1:9): storage unreachable")
    assert "AWS_ENDPOINT_URL" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    _assert_no_secret(message + caplog.text, s3_server)


def test_redact_removes_every_known_credential(s3_server):
    text = f"key={s3_server.access_key} secret={s3_server.secret_key} s3://u:p@bucket/x"
    assert redact(text) == "key=*** secret=*** s3://bucket/x"


# ---- shards -------------------------------------------------------------------------------------


def test_shards_are_committed_with_a_manifest_and_no_temporary_files(tmp_path):
    uri = str(tmp_path / "ds")
    manifest = write_shards([(png(i), f"c{i}", i) for i in range(12)], uri, rows_per_shard=5)
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 2] and manifest["rows"] == 12
    assert sorted(os.listdir(uri)) == [
        MANIFEST_NAME,
        "shard-00000.parquet",
        "shard-00001.parquet",
        "shard-00002.parquet",
    ]
    assert read_manifest(uri) == manifest
    table = pq.read_table(os.path.join(uri, "shard-00001.parquet"))
    assert table.column_names == ["image", "caption", "label"]
    assert table.column("caption").to_pylist() == ["c5", "c6", "c7", "c8", "c9"]


def test_an_interrupted_preparation_commits_no_partial_shard_and_no_manifest(tmp_path):
    uri = str(tmp_path / "ds")

    def records():
        for i in range(12):
            yield png(i), f"c{i}", i
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(records(), uri, rows_per_shard=5)
    assert sorted(os.listdir(uri)) == ["shard-00000.parquet", "shard-00001.parquet"]


def test_a_failed_shard_write_leaves_neither_the_shard_nor_its_temporary(tmp_path, monkeypatch):
    uri = str(tmp_path / "ds")

    def broken_write_table(table, out, **kwargs):
        out.write(b"PAR1 half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(shards_module.pq, "write_table", broken_write_table)
    with pytest.raises(StorageError, match=r"ds: cannot write shard shard-00000.parquet: disk full"):
        with ShardWriter(uri, rows_per_shard=2) as writer:
            writer.write(png(0), "a", 0)
            writer.write(png(1), "b", 1)
    assert os.listdir(uri) == []


def test_shards_on_s3_leave_only_committed_keys(s3_server):
    s3_server.create_bucket("shards")
    manifest = write_shards(
        [(png(i), f"c{i}", i) for i in range(7)], "s3://shards/fm/train", rows_per_shard=4
    )
    assert manifest["rows"] == 7
    # pyarrow may leave a zero-byte "fm/train/" folder marker; no temporary key survives.
    assert [k for k in s3_server.keys("shards") if not k.endswith("/")] == [
        "fm/train/_manifest.json",
        "fm/train/shard-00000.parquet",
        "fm/train/shard-00001.parquet",
    ]
    assert read_manifest("s3://shards/fm/train")["shards"] == manifest["shards"]


# ---- preparation --------------------------------------------------------------------------------


def test_fashion_mnist_templates_and_prompts():
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[7] == "Sneaker"
    assert not set(train_caption_templates) & set(eval_caption_templates)
    assert caption_for(7, "a photo of {}") == "a photo of a sneaker"
    assert caption_for(9, "a photo of {}") == "a photo of an ankle boot"
    prompts = eval_prompts()
    assert len(prompts) == 10 * len(eval_caption_templates)
    assert {label for _, label in prompts} == set(range(10))


def test_prepare_fashion_mnist_pads_to_32_and_captions_from_training_templates(tmp_path):
    source = tmp_path / "idx"
    source.mkdir()
    data = tiny_fashion_mnist(source)
    uri = f"file://{tmp_path}/fm/train"
    manifest = prepare_fashion_mnist(str(source), uri, split="train", rows_per_shard=10, seed=1)
    assert manifest["rows"] == 23 and [s["rows"] for s in manifest["shards"]] == [10, 10, 3]
    assert manifest["templates"] == list(train_caption_templates)
    table = pq.read_table(str(tmp_path / "fm/train"))
    images, labels = data["train"]
    assert table.column("label").to_pylist() == labels.tolist()
    for i, (image, caption, label) in enumerate(
        zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True)
    ):
        pixels = np.asarray(Image.open(io.BytesIO(image)))
        assert pixels.shape == (32, 32)
        np.testing.assert_array_equal(pixels[2:30, 2:30], images[i])
        assert pixels[:2].sum() == pixels[30:].sum() == pixels[:, :2].sum() == pixels[:, 30:].sum() == 0
        assert caption in {caption_for(label, t) for t in train_caption_templates}

    test_manifest = prepare_fashion_mnist(str(source), str(tmp_path / "fm/test"), split="test")
    captions = pq.read_table(str(tmp_path / "fm/test")).column("caption").to_pylist()
    assert test_manifest["rows"] == 10
    assert all(c in {p for p, _ in eval_prompts()} for c in captions)


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    (tmp_path / "x-idx").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(tmp_path / "x-idx"))


def test_prepare_image_folder_reads_sidecars_and_caption_tables(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png(10))
    (folder / "a.txt").write_text("  a grey square \n")
    (folder / "sub" / "b.jpg").write_bytes(jpeg(20))
    (folder / "sub" / "b.json").write_text(json.dumps({"caption": "a red rectangle", "label": 4}))
    (folder / "c.png").write_bytes(png(30))
    (folder / "captions.csv").write_text("file,caption,label\nc.png,from the table,2\n")
    (folder / "d.png").write_bytes(png(40))  # no caption anywhere
    manifest = prepare_image_folder(str(folder), str(tmp_path / "out"), seed=None)
    assert manifest["rows"] == 3 and manifest["skipped_no_caption"] == 1
    table = pq.read_table(str(tmp_path / "out")).to_pydict()
    assert table["caption"] == ["a grey square", "from the table", "a red rectangle"]
    assert table["label"] == [None, 2, 4]
    assert table["image"][2] == jpeg(20)


# ---- the Ray Data pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture
def ledger(request):
    return f"ledger-{request.node.name}"


def test_parquet_ingest_skips_and_counts_bad_records(ray_cluster, tmp_path, ledger):
    from workers.data.ingest import build_dataset, data_metrics

    uri = str(tmp_path / "ds")
    write_shards(bad_parquet_records(40) + [(png(i), f"c{i}", 0) for i in range(40)], uri, rows_per_shard=40)
    ds = build_dataset(uri, resolution=32, channels=1, max_bad_fraction=0.2, batch_size=8, ledger=ledger)
    batch = ds.take_batch(100, batch_format="numpy")
    assert batch["pixels"].shape == (75, 1, 32, 32) and batch["pixels"].dtype == np.float32
    assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0
    skipped = {"shard-00000.parquet:" + str(i) for i in (3, 11, 17, 23, 29)}
    assert not skipped & set(batch["key"])
    assert data_metrics(ledger) == {"data/records": 75, "data/bad_records": 5, "data/bad_fraction": 5 / 80}
    # A record's pixels come from its own image: record 5 is a uniform PNG of value 5.
    row = list(batch["key"]).index("shard-00000.parquet:5")
    np.testing.assert_allclose(batch["pixels"][row], 5 / 127.5 - 1.0, atol=1e-6)
    assert batch["caption"][row] == "caption 5" and batch["label"][row] == 5


def test_too_many_bad_records_fail_the_run_naming_the_shard(ray_cluster, tmp_path, ledger):
    from workers.data.ingest import BadRecordsError, build_dataset

    uri = str(tmp_path / "ds")
    write_shards([(png(i), f"c{i}", 0) for i in range(40)] + bad_parquet_records(40), uri, rows_per_shard=40)
    ds = build_dataset(uri, channels=1, ledger=ledger)  # default max_bad_fraction: 1%
    with pytest.raises(BadRecordsError) as err:
        ds.take_all()
    message = str(err.value)
    assert f"shard {uri}/shard-00001.parquet:" in message
    assert "of 40 records are bad" in message and "max_bad_fraction=1.0%" in message
    assert "shard-00000.parquet" not in message


def test_webdataset_ingest_counts_missing_captions_and_truncation(ray_cluster, tmp_path, ledger):
    from workers.data.ingest import BadRecordsError, build_dataset, data_metrics

    folder = tmp_path / "wds"
    folder.mkdir()
    samples = [(f"{i:05d}", {"png": png(i, mode="RGB"), "txt": f"sample {i}".encode()}) for i in range(8)]
    samples += [
        ("00008", {"jpg": jpeg(8), "json": json.dumps({"caption": "from json", "label": 3}).encode()})
    ]
    samples += [("00009", {"png": png(9, mode="RGB")})]  # no caption
    (folder / "00000.tar").write_bytes(tar_bytes(samples))
    whole = tar_bytes([(f"x{i}", {"png": png(i), "txt": b"tail"}) for i in range(6)])
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        cut = tar.getmember("x4.png").offset_data + 20
    (folder / "00001.tar").write_bytes(whole[:cut])  # truncated inside x4's image

    ds = build_dataset(str(folder), format="webdataset", channels=3, max_bad_fraction=0.5, ledger=ledger)
    batch = ds.take_batch(100, batch_format="numpy")
    counts = data_metrics(ledger)
    assert counts["data/bad_records"] == 2  # the caption-less sample and the truncated one
    assert counts["data/records"] == len(batch["key"]) == 9 + 4  # x0..x3 precede the cut
    assert batch["pixels"].shape[1:] == (3, 32, 32)
    row = list(batch["key"]).index("00000.tar:00008")
    assert batch["caption"][row] == "from json" and batch["label"][row] == 3

    one = str(folder / "00000.tar")  # a URI may name a single shard
    with pytest.raises(BadRecordsError, match=f"shard {one}: 1 of 10 records are bad"):
        build_dataset(one, format="webdataset", max_bad_fraction=0.05, ledger=ledger).take_all()


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(ray_cluster, tmp_path, ledger):
    from workers.data.ingest import build_dataset, shard_order

    names = [f"s{i}" for i in range(10)]
    assert shard_order(names, 0, 1) == shard_order(names, 0, 1) != shard_order(names, 0, 2)
    uri = str(tmp_path / "ds")
    write_shards([(png(i), f"c{i}", i % 10) for i in range(48)], uri, rows_per_shard=12)

    def keys(**kwargs) -> list[tuple[str, int]]:
        ds = build_dataset(uri, channels=1, shuffle_buffer=8, preserve_order=True, ledger=ledger, **kwargs)
        return [(row["key"], row["epoch"]) for row in ds.select_columns(["key", "epoch"]).take_all()]

    first, again, other = keys(seed=3, epoch=0), keys(seed=3, epoch=0), keys(seed=3, epoch=1)
    assert first == again and first != other
    assert sorted(k for k, _ in first) == sorted(k for k, _ in other) and len(set(first)) == 48
    rows_in_shards = [int(k.split(":")[1]) for k, _ in first]
    assert rows_in_shards != list(range(12)) * 4  # shuffled within shards too
    assert keys(seed=3, epoch=0, num_epochs=2) == first + other


def test_streaming_split_gives_each_training_worker_a_disjoint_share(ray_cluster, tmp_path, ledger):
    from concurrent.futures import ThreadPoolExecutor

    from workers.data.ingest import build_dataset

    uri = str(tmp_path / "ds")
    write_shards([(png(i), f"c{i}", 0) for i in range(64)], uri, rows_per_shard=8)
    splits = build_dataset(uri, channels=1, batch_size=4, ledger=ledger).streaming_split(2, equal=True)

    def consume(it) -> list[str]:  # both ranks must read in step, as Ray Train's workers do
        return [k for batch in it.iter_batches(batch_size=4, batch_format="numpy") for k in batch["key"]]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(consume, splits)
    assert len(a) == len(b) == 32 and not set(a) & set(b)


def _fake_encoder_factory(as_mapping: bool):
    """A picklable factory of a trivial text encoder: the embedding encodes each caption's length."""

    class FakeEncoder:
        encoded: list[str] = []

        def encode(self, captions):
            self.encoded.extend(captions)
            lengths = torch.tensor([float(len(c)) for c in captions])
            pooled = lengths[:, None].repeat(1, 4)
            if as_mapping:
                return {
                    "pooled": pooled.to(torch.bfloat16),
                    "prompt_embeds": pooled[:, None, :].repeat(1, 3, 1),
                }
            return pooled

    return FakeEncoder


def test_caption_embedder_encodes_each_distinct_caption_once():
    from workers.data.ingest import CaptionEmbedder

    factory = _fake_encoder_factory(as_mapping=True)
    embed = CaptionEmbedder(factory, device="cpu")
    out = embed({"caption": np.array(["ab", "abcd", "ab"], dtype=object)})
    assert out["text_embedding_pooled"].dtype == np.float32
    np.testing.assert_array_equal(out["text_embedding_pooled"][:, 0], [2.0, 4.0, 2.0])
    assert out["text_embedding_prompt_embeds"].shape == (3, 3, 4)
    out = embed({"caption": np.array(["abcd", "abc"], dtype=object)})
    np.testing.assert_array_equal(out["text_embedding_pooled"][:, 0], [4.0, 3.0])
    assert factory.encoded == ["ab", "abcd", "abc"]

    uncached = CaptionEmbedder(_fake_encoder_factory(as_mapping=False), cache_size=0, dtype="float16")
    out = uncached({"caption": np.array(["ab", "ab"], dtype=object)})
    assert out["text_embedding"].dtype == np.float16 and out["text_embedding"].shape == (2, 4)


def test_caption_embeddings_in_an_actor_pool(ray_cluster, tmp_path, ledger):
    from workers.data.ingest import build_dataset, embed_captions

    uri = str(tmp_path / "ds")
    write_shards([(png(i), "x" * (i + 1), 0) for i in range(20)], uri, rows_per_shard=10)
    ds = embed_captions(
        build_dataset(uri, channels=1, ledger=ledger), _fake_encoder_factory(as_mapping=False), concurrency=1
    )
    batch = ds.take_batch(100, batch_format="numpy")
    assert batch["text_embedding"].shape == (20, 4)
    np.testing.assert_array_equal(batch["text_embedding"][:, 0], [len(c) for c in batch["caption"]])


def test_s3_ingest_end_to_end_without_credentials_in_logs(ray_cluster, s3_server, tmp_path, ledger, caplog):
    from workers.data.ingest import BadRecordsError, build_dataset, data_metrics

    caplog.set_level(logging.INFO)
    source = tmp_path / "idx"
    source.mkdir()
    tiny_fashion_mnist(source, n_train=30)
    s3_server.create_bucket("fmnist")
    prepare_fashion_mnist(str(source), "s3://fmnist/train", rows_per_shard=8)
    ds = build_dataset("s3://fmnist/train", channels=1, ledger=ledger)
    batch = ds.take_batch(100, batch_format="numpy")
    assert sorted(batch["label"].tolist()) == sorted((np.arange(30) % 10).tolist())
    assert data_metrics(ledger)["data/records"] == 30

    write_shards(bad_parquet_records(30), "s3://fmnist/bad")
    with pytest.raises(BadRecordsError, match="shard s3://fmnist/bad/shard-00000.parquet: "):
        build_dataset("s3://fmnist/bad", channels=1, ledger=ledger).take_all()

    _assert_no_secret(caplog.text, s3_server)
    logs_dir = ray_cluster._private.worker._global_node.get_logs_dir_path()
    for root, _, files in os.walk(logs_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                content = f.read()
            assert s3_server.secret_key.encode() not in content, name
