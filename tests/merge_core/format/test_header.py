"""Header parsing: real files from the safetensors library parse; each malformed kind is refused by name."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.errors import InputError
from merge_core.format.header import MAX_HEADER_BYTES, encode_header, parse_header
from merge_core.inputs.checkpoint import read_shard_header
from merge_core.io.local import LocalStorage


def write_raw(tmp_path, header: object, data: bytes = b"", raw_header: bytes | None = None) -> LocalStorage:
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body + data)
    return LocalStorage(str(tmp_path))


def rejected(storage: LocalStorage) -> str:
    with pytest.raises(InputError) as info:
        read_shard_header(storage, "model.safetensors")
    return str(info.value)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    tensors = {"b": torch.ones(3, 5, dtype=torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4, dtype=torch.float16)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    header = read_shard_header(LocalStorage(str(tmp_path)), "model.safetensors")
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        "b": ("BF16", (3, 5)), "a": ("I64", (7,)), "scalar": ("F32", ()), "empty": ("F16", (0, 4))}
    assert header.metadata == {"format": "pt"}
    assert [t.start for t in header.tensors] == sorted(t.start for t in header.tensors)


def test_encoded_header_round_trips_through_the_safetensors_library(tmp_path):
    layout = [("w", "BF16", (2, 3)), ("v", "F32", (4,)), ("i", "I8", (5,))]
    header, infos = encode_header(layout, {"format": "pt"})
    assert len(header) % 8 == 0
    values = {"w": torch.randn(2, 3).to(torch.bfloat16), "v": torch.randn(4), "i": torch.arange(5, dtype=torch.int8)}
    data = b"".join(values[n].reshape(-1).view(torch.uint8).numpy().tobytes() for n, _, _ in layout)
    (tmp_path / "x.safetensors").write_bytes(header + data)
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[n], values[n]) for n in values)
    assert [(i.start, i.end) for i in infos] == [(0, 12), (12, 28), (28, 33)]


def test_truncated_file(tmp_path):
    storage = write_raw(tmp_path, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 10)
    assert "file is truncated" in rejected(storage)


def test_too_short_for_a_length_prefix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\1\2\3")
    assert "too short to be safetensors" in rejected(LocalStorage(str(tmp_path)))


def test_absurd_header_length(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert "exceeds the 100000000-byte limit" in rejected(LocalStorage(str(tmp_path)))


def test_header_length_past_end_of_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 4096) + b"{}")
    assert "runs past the end" in rejected(LocalStorage(str(tmp_path)))


def test_header_not_json(tmp_path):
    assert "header is not valid JSON" in rejected(write_raw(tmp_path, None, raw_header=b"{not json"))


def test_header_not_an_object(tmp_path):
    assert "not a JSON object" in rejected(write_raw(tmp_path, [1, 2]))


def test_duplicate_tensor_names(tmp_path):
    raw = (b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
           b'"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
    assert "duplicate key 'w'" in rejected(write_raw(tmp_path, None, b"\0\0", raw_header=raw))


def test_unknown_dtype(tmp_path):
    message = rejected(write_raw(tmp_path, {"w": {"dtype": "F17", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"))
    assert "tensor w: unknown dtype 'F17'" in message and "BF16" in message


def test_overlapping_offsets(tmp_path):
    storage = write_raw(tmp_path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    assert "tensor b: data_offsets [4, 12] overlaps the previous tensor" in rejected(storage)


def test_gap_between_tensors(tmp_path):
    storage = write_raw(tmp_path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12)
    assert "leaves a gap before it" in rejected(storage)


def test_offsets_out_of_file(tmp_path):
    storage = write_raw(tmp_path, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    assert "tensors end at data offset 16 but the file holds 8 data bytes" in rejected(storage)


def test_trailing_bytes(tmp_path):
    storage = write_raw(tmp_path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9)
    assert "5 trailing bytes after the last tensor" in rejected(storage)


def test_size_does_not_match_dtype_and_shape(tmp_path):
    storage = write_raw(tmp_path, {"a": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 4]}}, b"\0" * 4)
    assert "BF16[3] needs 6 bytes but data_offsets span 4" in rejected(storage)


def test_huge_shape_refused_before_allocating(tmp_path):
    shape = [2**40, 2**40]
    storage = write_raw(tmp_path, {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}, b"\0" * 4)
    assert "needs 4835703278458516698824704 bytes but data_offsets span 4" in rejected(storage)


@pytest.mark.parametrize("entry, expected", [
    ({"dtype": "F32", "shape": [1]}, "lacks dtype, shape or data_offsets"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "is not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "are not [begin, end]"),
])
def test_malformed_entries(tmp_path, entry, expected):
    assert expected in rejected(write_raw(tmp_path, {"a": entry}, b"\0" * 4))


def test_metadata_must_be_strings():
    with pytest.raises(InputError, match="__metadata__ is not a map of strings"):
        parse_header(json.dumps({"__metadata__": {"n": 1}}).encode(), 8 + 14, "x")
