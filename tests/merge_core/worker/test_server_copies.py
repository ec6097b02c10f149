"""S3 to S3 on the real server (SeaweedFS): what no adapter changes, the server copies itself
(UploadPartCopy with a source range, CopyObject for a whole untouched shard); only the rest is
sent, and the output is still PEFT's bit for bit, with a digest b3sum would give."""

from __future__ import annotations

import collections
import json

import blake3
import pytest

from merge_core.io import s3 as s3_backend
from merge_core.names import MANIFEST_NAME
from tests.conftest import download, upload_dir
from tests.local_merge import merge_without_ray
from tests.reference import assert_bit_identical, load_checkpoint, make_adapter, make_base, peft_merged

# Feed-forward tensors of 4 MiB: the runs between one layer's q/v projections and the next's are
# long enough (over 5 MiB) to be parts of their own.
SIZES = dict(hidden_size=512, intermediate_size=4096, vocab_size=8192, num_hidden_layers=3)


@pytest.fixture(scope="module")
def qv_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qv")
    base = make_base(str(root / "base"), max_shard_size="20MB", **SIZES)
    adapter = make_adapter(str(root / "adapter"), sizes=SIZES, r=8, target_modules=["q_proj", "v_proj"])
    return base, adapter, peft_merged(base, adapter, str(root / "peft"))


@pytest.fixture
def requests(monkeypatch):
    """Every S3 request our clients make, by operation, the bytes sent as bodies of parts and PUTs,
    and the bytes asked for by GETs, by key ("read <key>")."""
    seen = collections.Counter()
    made = s3_backend.make_client

    def counting_client():
        client = made()

        def count(params, model, **_):  # params: the request as it is about to be sent
            seen[model.name] += 1
            body = params.get("body")
            if model.name in ("UploadPart", "PutObject") and body is not None:
                seen["bytes sent"] += body.getbuffer().nbytes if hasattr(body, "getbuffer") else len(body)
            if model.name == "GetObject":
                first, _, last = params["headers"].get("Range", "bytes=0-")[len("bytes="):].partition("-")
                seen[f"read {params['url_path'].lstrip('/')}"] += int(last) - int(first) + 1 if last else 2**40
        client.meta.events.register("before-call.s3.*", count)
        return client
    monkeypatch.setattr(s3_backend, "make_client", counting_client)
    return seen


def test_untouched_bytes_are_copied_by_the_server_and_the_output_is_peft(s3, qv_models, requests, tmp_path):
    base_dir, adapter_dir, reference = qv_models
    base, adapter = upload_dir(s3, base_dir, "qv/base"), upload_dir(s3, adapter_dir, "qv/adapter")
    merge_without_ray(base, [adapter], "s3://models/qv/out", part_size_mb=5)
    out = download(s3, "qv/out", tmp_path / "out")
    assert_bit_identical(load_checkpoint(out), reference)

    manifest = json.load(open(tmp_path / "out" / MANIFEST_NAME))
    shards = manifest["output"]["shards"]
    total = sum(s["size"] for s in shards)
    copied = sum(s["bytes_copied"] for s in shards)
    assert manifest["digest"] == "blake3"
    for shard in shards:  # the digest is the file's own, copied ranges included
        assert shard["blake3"] == blake3.blake3(open(tmp_path / "out" / shard["name"], "rb").read()).hexdigest()
    assert requests["UploadPartCopy"] > 0, requests
    untouched = [s for s in shards if not s["fused_tensors"]]
    assert requests["CopyObject"] == len(untouched), (requests, [s["name"] for s in shards])
    # q and v are a small part of each layer: most bytes were copied, and only the rest were sent
    assert copied > 0.7 * total and requests["bytes sent"] < total - copied + 6 * 2**20 * len(shards), \
        (copied, total, requests)
    # The store checked each uploaded shard's CRC32 itself: the read-back downloads only the shards
    # it copied whole (CopyObject carries no checksum of ours); the final task reads headers and samples.
    for shard in shards:
        read = requests[f"read qv/out/{shard['name']}"]
        assert (read >= shard["size"]) == (not shard["fused_tensors"]), (shard["name"], read, shard["size"])
