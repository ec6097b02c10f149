"""Base checkpoint discovery: index checks, shard headers, which files are copied."""

from __future__ import annotations

import json
import os

import pytest

from merge_core.errors import InputError
from merge_core.inputs.checkpoint import load_base
from merge_core.io.local import LocalStorage
from merge_core.names import INDEX_NAME
from tests.reference import make_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return make_base(str(tmp_path_factory.mktemp("base") / "llama"))


def copy_of(base_dir: str, tmp_path) -> str:
    target = tmp_path / "copy"
    target.mkdir()
    for name in os.listdir(base_dir):
        (target / name).write_bytes(open(os.path.join(base_dir, name), "rb").read())
    return str(target)


def edit_index(path: str, edit) -> None:
    index_path = os.path.join(path, INDEX_NAME)
    index = json.load(open(index_path))
    edit(index)
    json.dump(index, open(index_path, "w"))


def test_sharded_checkpoint_is_described_from_headers(base_dir):
    base = load_base(LocalStorage(base_dir))
    assert len(base.shards) > 2
    index = json.load(open(os.path.join(base_dir, INDEX_NAME)))
    assert dict(base.weight_map) == index["weight_map"]
    assert base.total_tensor_bytes == index["metadata"]["total_size"]
    assert base.extra_files == ("config.json", "generation_config.json")


def test_single_file_checkpoint(tmp_path):
    path = make_base(str(tmp_path / "one"), max_shard_size="50MB")
    base = load_base(LocalStorage(path))
    assert [s.name for s in base.shards] == ["model.safetensors"]
    assert set(base.weight_map.values()) == {"model.safetensors"}


def test_weight_files_in_other_formats_are_not_copied(base_dir, tmp_path):
    path = copy_of(base_dir, tmp_path)
    for name in ("pytorch_model.bin", "tokenizer.json", "consolidated.00.pth", "special_tokens_map.json"):
        (tmp_path / "copy" / name).write_text("x")
    assert load_base(LocalStorage(path)).extra_files == (
        "config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json")


def test_missing_shard(base_dir, tmp_path):
    path = copy_of(base_dir, tmp_path)
    os.unlink(os.path.join(path, "model-00002-of-00003.safetensors"))
    with pytest.raises(InputError, match=r"model-00002-of-00003.safetensors: listed in model.safetensors.index.json "
                                         r"but missing \(1 shard\(s\) missing in all\)"):
        load_base(LocalStorage(path))


@pytest.mark.parametrize("bad_name", ["../model-00001-of-00003.safetensors", "sub/model.safetensors", ".."])
def test_index_names_outside_the_directory(base_dir, tmp_path, bad_name):
    path = copy_of(base_dir, tmp_path)
    edit_index(path, lambda index: index["weight_map"].update({"lm_head.weight": bad_name}))
    with pytest.raises(InputError, match="is not a plain file name"):
        load_base(LocalStorage(path))


def test_index_without_weight_map(base_dir, tmp_path):
    path = copy_of(base_dir, tmp_path)
    edit_index(path, lambda index: index.pop("weight_map"))
    with pytest.raises(InputError, match="has no weight_map object"):
        load_base(LocalStorage(path))


def test_index_pointing_at_the_wrong_shard(base_dir, tmp_path):
    path = copy_of(base_dir, tmp_path)
    edit_index(path, lambda index: index["weight_map"].update({"lm_head.weight": "model-00001-of-00003.safetensors"}))
    with pytest.raises(InputError, match="tensor lm_head.weight is in model-00003-of-00003.safetensors but the "
                                         "weight_map says model-00001-of-00003.safetensors"):
        load_base(LocalStorage(path))


def test_index_naming_a_tensor_no_shard_has(base_dir, tmp_path):
    path = copy_of(base_dir, tmp_path)
    edit_index(path, lambda index: index["weight_map"].update({"ghost.weight": "model-00001-of-00003.safetensors"}))
    with pytest.raises(InputError, match="tensor ghost.weight is in the weight_map but not in the shard"):
        load_base(LocalStorage(path))


def test_no_checkpoint_at_all(tmp_path):
    with pytest.raises(InputError, match="does not exist or is empty"):
        load_base(LocalStorage(str(tmp_path)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="no model.safetensors.index.json or model.safetensors found; it "
                                         "holds pytorch_model.bin"):
        load_base(LocalStorage(str(tmp_path)))
