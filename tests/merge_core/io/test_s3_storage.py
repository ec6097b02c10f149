"""The s3:// backend against a real S3 server: ranged reads, multipart writes, aborts, conditional create."""

from __future__ import annotations

import base64
import os
import zlib

import pytest
from botocore.exceptions import ClientError

from merge_core.errors import InputError, TransientStorageError
from merge_core.inputs.adapter import load_adapter
from merge_core.inputs.checkpoint import load_base
from merge_core.io.registry import open_storage
from merge_core.io.s3_writer import MIN_PART_BYTES
from merge_core.io.storage import StorageOptions
from merge_core.planning.planner import plan_merge
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_merge import merge_shard
from tests.conftest import BUCKET, list_keys, open_uploads, upload_dir
from tests.reference import MEDIUM, make_adapter, make_base

SMALL_PARTS = StorageOptions(part_size=MIN_PART_BYTES)


def test_ranged_reads_listing_and_single_put(s3):
    storage = open_storage(f"s3://{BUCKET}/basic", SMALL_PARTS)
    storage.write_bytes("a.bin", bytes(range(256)) * 4)
    assert storage.size("a.bin") == 1024 and storage.exists("a.bin") and not storage.exists("b.bin")
    assert storage.read_range("a.bin", 250, 10) == bytes([250, 251, 252, 253, 254, 255, 0, 1, 2, 3])
    assert storage.list_names() == ["a.bin"]
    with pytest.raises(FileNotFoundError):
        storage.size("missing.bin")
    assert open_uploads(s3, "basic") == []


def test_multipart_upload_in_several_parts(s3):
    storage = open_storage(f"s3://{BUCKET}/multi", SMALL_PARTS)
    payload = os.urandom(3 * MIN_PART_BYTES + 12345)
    with storage.open_writer("big.bin") as writer:
        for start in range(0, len(payload), 1_000_000):
            writer.write(payload[start:start + 1_000_000])
        assert open_uploads(s3, "multi") == ["multi/big.bin"], "parts go up while the object is written"
        assert list_keys(s3, "multi") == [], "nothing is visible before commit"
        writer.commit()
    head = s3.client().head_object(Bucket=BUCKET, Key="multi/big.bin")
    assert head["ContentLength"] == len(payload) and head["ETag"].strip('"').endswith("-4")
    assert storage.read_range("big.bin", MIN_PART_BYTES - 5, 10) == payload[MIN_PART_BYTES - 5:MIN_PART_BYTES + 5]
    assert open_uploads(s3, "multi") == []


def test_abort_leaves_no_upload_and_no_object(s3):
    storage = open_storage(f"s3://{BUCKET}/aborted", SMALL_PARTS)
    with pytest.raises(RuntimeError):
        with storage.open_writer("x.bin") as writer:
            writer.write(os.urandom(2 * MIN_PART_BYTES + 1))
            raise RuntimeError("worker failed")
    assert open_uploads(s3, "aborted") == [] and list_keys(s3, "aborted") == []


def test_exclusive_create_refuses_an_existing_object(s3):
    storage = open_storage(f"s3://{BUCKET}/exclusive")
    storage.write_bytes("index.json", b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes("index.json", b"second", exclusive=True)
    assert storage.read_bytes("index.json") == b"first"


def test_unknown_bucket_is_bad_input(s3):
    with pytest.raises(InputError, match="s3://no-such-bucket: bucket does not exist"):
        open_storage("s3://no-such-bucket/x").list_names()


def test_failure_in_the_middle_of_a_shard_upload_aborts_it(s3, tmp_path):
    """The base shard is cut short after planning: the worker fails after uploading parts."""
    base = make_base(str(tmp_path / "base"), max_shard_size="50MB", **MEDIUM)
    adapter = make_adapter(str(tmp_path / "adapter"), sizes=MEDIUM)
    base_uri = upload_dir(s3, base, "cut/base")
    plan = plan_merge(load_base(open_storage(base_uri)), [load_adapter(open_storage(adapter))], [1.0])
    (task,) = plan.tasks
    assert task.shard.size > 4 * MIN_PART_BYTES
    cut = open(os.path.join(base, "model.safetensors"), "rb").read()[:3 * MIN_PART_BYTES]
    s3.client().put_object(Bucket=BUCKET, Key="cut/base/model.safetensors", Body=cut)

    with pytest.raises(InputError, match="the object changed or was truncated while being read"):
        merge_shard(task, MergeJob.of(plan, f"s3://{BUCKET}/cut/out", storage=SMALL_PARTS))
    assert open_uploads(s3, "cut/out") == [] and list_keys(s3, "cut/out") == []


def test_discarding_incomplete_uploads_spares_deeper_prefixes(s3):
    client = s3.client()
    mine = client.create_multipart_upload(Bucket=BUCKET, Key="nest/out/shard.safetensors")
    theirs = client.create_multipart_upload(Bucket=BUCKET, Key="nest/out/other-job/shard.safetensors")
    open_storage(f"s3://{BUCKET}/nest/out").discard_incomplete()
    assert open_uploads(s3, "nest/out") == ["nest/out/other-job/shard.safetensors"]
    client.abort_multipart_upload(Bucket=BUCKET, Key="nest/out/other-job/shard.safetensors",
                                  UploadId=theirs["UploadId"])
    assert mine["UploadId"]


def test_rename_is_a_server_side_copy_then_delete(s3):
    storage = open_storage(f"s3://{BUCKET}/renamed")
    storage.write_bytes(".staged", b"payload")
    storage.rename(".staged", "model.safetensors")
    assert storage.list_names() == ["model.safetensors"] and storage.read_bytes("model.safetensors") == b"payload"


def crc32_text(payload: bytes) -> str:
    return base64.b64encode(zlib.crc32(payload).to_bytes(4, "big")).decode()


def test_every_object_carries_a_crc32_of_all_its_bytes_that_the_store_checked(s3):
    """One PUT, a multipart upload, and one whose bytes the server partly copied: the store holds the
    whole object's CRC32 (FULL_OBJECT), which it verified itself, so the read-back need not download."""
    storage = open_storage(f"s3://{BUCKET}/checked", SMALL_PARTS)
    small, big = os.urandom(1000), os.urandom(2 * MIN_PART_BYTES + 777)
    written = {"small.bin": [small], "big.bin": [big[:500], big[500:]]}
    for name, pieces in written.items():
        with storage.open_writer(name) as writer:
            for piece in pieces:
                writer.write(piece)
            writer.commit()
        assert writer.store_checked, name
    with storage.open_writer("copied.bin") as writer:  # a short start, topped up from the copy's own bytes
        writer.write(small)
        writer.write_copy(big, storage, "big.bin", 0)
        writer.commit()
    assert writer.store_checked and writer.bytes_copied > MIN_PART_BYTES
    for name, payload in (("small.bin", small), ("big.bin", big), ("copied.bin", small + big)):
        head = s3.client().head_object(Bucket=BUCKET, Key=f"checked/{name}", ChecksumMode="ENABLED")
        assert head["ChecksumCRC32"] == crc32_text(payload), name
        assert storage.read_bytes(name) == payload


def test_an_object_whose_bytes_are_not_those_hashed_is_refused_by_the_store(s3):
    storage = open_storage(f"s3://{BUCKET}/corrupt", SMALL_PARTS)
    for name, size in (("one-put.bin", 1000), ("parts.bin", 2 * MIN_PART_BYTES + 5)):
        with pytest.raises(TransientStorageError, match="BadDigest"):
            with storage.open_writer(name) as writer:
                writer.write(os.urandom(size))
                writer._crc ^= 1  # what was sent is no longer what the writer hashed
                writer.commit()
    assert list_keys(s3, "corrupt") == [] and open_uploads(s3, "corrupt") == []


def test_a_store_that_refuses_checksums_gets_objects_without_them(s3):
    """An S3-compatible store that takes no checksums (its answer given to the real client): the
    objects are written without, and read back as before."""
    storage = open_storage(f"s3://{BUCKET}/plain", SMALL_PARTS)

    def refuse(params, **_):
        if any(header.lower().startswith("x-amz-checksum") for header in params["headers"]):
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "checksums"}}, "request")
    storage.client.meta.events.register("before-call.s3.*", refuse)
    for name, payload in (("big.bin", os.urandom(2 * MIN_PART_BYTES + 1)), ("small.bin", os.urandom(10))):
        with storage.open_writer(name) as writer:
            writer.write(payload)
            writer.commit()
        assert not writer.store_checked and storage.read_bytes(name) == payload
    assert not storage.checksums and open_uploads(s3, "plain") == []
