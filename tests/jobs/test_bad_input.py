"""Every kind of bad input through the command: exit 2, one line naming the file or tensor and the
fix, no traceback, nothing written, an existing output untouched. Run in-process: all of these
are refused before Ray starts."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from jobs.cli import main
from merge_core.names import INDEX_NAME
from tests.jobs.conftest import cli

A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def rewrite_header(path: str, edit) -> None:
    """Change a safetensors header in place, keeping the data bytes as they are."""
    raw = open(path, "rb").read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    edit(header)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    open(path, "wb").write(struct.pack("<Q", len(body)) + body + raw[8 + length:])


def extend_last(header: dict) -> None:
    """The last tensor in the file now claims twice its elements: its end lies past the file's."""
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    start, end = header[name]["data_offsets"]
    header[name].update(shape=[2 * header[name]["shape"][0], *header[name]["shape"][1:]],
                        data_offsets=[start, start + 2 * (end - start)])


def shift_second_back(header: dict) -> None:
    """The second tensor in the file now starts 2 bytes inside the first (same size)."""
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    start, end = header[names[1]]["data_offsets"]
    header[names[1]]["data_offsets"] = [start - 2, end - 2]


def shard_of(base: str, name: str) -> str:
    return os.path.join(base, json.load(open(os.path.join(base, INDEX_NAME)))["weight_map"][name])


def edit_adapter_tensors(adapter: str, edit) -> None:
    path = os.path.join(adapter, "adapter_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(adapter: str, edit) -> None:
    path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(path))
    edit(config)
    json.dump(config, open(path, "w"))


def truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


CASES = {
    "truncated shard": (lambda b, a: truncate(shard_of(b, "lm_head.weight"), os.path.getsize(
        shard_of(b, "lm_head.weight")) - 100), "the file is truncated"),
    "absurd header length": (lambda b, a: open(shard_of(b, "lm_head.weight"), "r+b").write(
        struct.pack("<Q", 2**60)), "exceeds the 100000000-byte limit"),
    "header not JSON": (lambda b, a: open(shard_of(b, "lm_head.weight"), "r+b").write(
        struct.pack("<Q", 16) + b"{{{{{{{{"), "header is not valid JSON"),
    "overlapping offsets": (lambda b, a: rewrite_header(shard_of(b, "model.norm.weight"), shift_second_back),
                            "overlaps the previous tensor"),
    "out-of-file offsets": (lambda b, a: rewrite_header(shard_of(b, "model.norm.weight"), extend_last),
                            "the file is truncated"),
    "unknown dtype": (lambda b, a: rewrite_header(shard_of(b, "lm_head.weight"), lambda h: h[
        "lm_head.weight"].update(dtype="BF17")), "unknown dtype 'BF17'"),
    "huge shape": (lambda b, a: rewrite_header(shard_of(b, "lm_head.weight"), lambda h: h[
        "lm_head.weight"].update(shape=[2**40, 2**40])), "needs 2417851639229258349412352 bytes"),
    "shard missing": (lambda b, a: os.unlink(shard_of(b, "lm_head.weight")), "but missing"),
    "index names a path": (lambda b, a: json.dump(
        {"weight_map": {"lm_head.weight": "../../etc/passwd"}}, open(os.path.join(b, INDEX_NAME), "w")),
        "is not a plain file name"),
    "adapter config not JSON": (lambda b, a: open(os.path.join(a, "adapter_config.json"), "w").write("r: 8"),
                                "adapter_config.json: not valid JSON"),
    "adapter config lacks fields": (lambda b, a: edit_config(a, lambda c: c.pop("lora_alpha")),
                                    "lacks required field(s) lora_alpha"),
    "unknown peft_type": (lambda b, a: edit_config(a, lambda c: c.update(peft_type="OFT")),
                          "peft_type 'OFT' is not supported"),
    "ranks disagree": (lambda b, a: edit_adapter_tensors(a, lambda t: t.update({B_KEY: t[B_KEY][:, :2].clone()})),
                       "lora_A rank 4 and lora_B rank 2 disagree"),
    "delta does not fit": (lambda b, a: edit_adapter_tensors(a, lambda t: t.update(
        {A_KEY: torch.ones(4, 32), B_KEY: torch.ones(64, 4)})), "delta shape [64, 32] does not fit"),
    "module the base lacks": (lambda b, a: edit_adapter_tensors(a, lambda t: t.update({
        A_KEY.replace("layers.0", "layers.7"): t[A_KEY].clone(), B_KEY.replace("layers.0", "layers.7"): t[B_KEY].clone()})),
        "targets model.layers.7.self_attn.q_proj.weight, which the base checkpoint does not have"),
    "NaN in adapter": (lambda b, a: edit_adapter_tensors(a, lambda t: t[B_KEY].__setitem__((3, 1), float("nan"))),
                       f"tensor {B_KEY}: holds NaN or Inf values"),
    "Inf in adapter": (lambda b, a: edit_adapter_tensors(a, lambda t: t[A_KEY].__setitem__((0, 0), float("inf"))),
                       f"tensor {A_KEY}: holds NaN or Inf values"),
    "pickle-only adapter": (lambda b, a: (os.unlink(os.path.join(a, "adapter_model.safetensors")), open(
        os.path.join(a, "adapter_model.bin"), "wb").write(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.")),
        "stored only as a pickle, which lora-merge does not unpickle unasked"),
    "empty adapter": (lambda b, a: save_file({}, os.path.join(a, "adapter_model.safetensors")), "holds no tensors"),
}


def digest_tree(path: str) -> dict[str, str]:
    return {n: hashlib.sha256(open(os.path.join(path, n), "rb").read()).hexdigest() for n in sorted(os.listdir(path))}


@pytest.mark.parametrize("existing_output", [False, True], ids=["fresh output", "existing model"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_one_line_and_nothing_written(models, tmp_path, capsys, case, existing_output):
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    shutil.copytree(models.base, base)
    shutil.copytree(models.adapter, adapter)
    damage, expected = CASES[case]
    damage(base, adapter)
    out = tmp_path / "out"
    if existing_output:
        shutil.copytree(models.base, out)  # stands in for a model published earlier
    before = digest_tree(str(out)) if existing_output else None

    code = main(["merge", "--base", base, "--adapter", adapter, "--output", str(out)]
                + (["--overwrite"] if existing_output else []))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert expected in lines[0]
    assert lines[0].endswith(")"), "the line ends with how to fix it"
    if existing_output:
        assert digest_tree(str(out)) == before, "--overwrite does not touch the old model when the input is bad"
    else:
        assert not out.exists()
    assert not os.path.exists("/tmp/pwned")


def test_an_existing_model_is_refused_without_overwrite(models, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(models.base, out)
    before = digest_tree(str(out))
    code = main(["merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"error: {out}/{INDEX_NAME}: the output already holds a model "
                                               "(pass --overwrite to replace it, or choose another --output)")
    assert digest_tree(str(out)) == before


def test_a_pickled_adapter_loads_only_with_allow_pickle_and_only_as_tensors(models, ray_session, tmp_path,
                                                                           capsys):
    from tests.reference import assert_bit_identical, load_checkpoint

    cluster, _ = ray_session
    adapter = tmp_path / "adapter"
    shutil.copytree(models.adapter, adapter)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    os.unlink(adapter / "adapter_model.safetensors")
    torch.save(tensors, adapter / "adapter_model.bin")
    out = tmp_path / "out"
    args = ["merge", "--base", models.base, "--adapter", str(adapter), "--output", str(out)]
    assert main(args) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not out.exists()

    run = cli(*args, "--allow-pickle", "--ray-address", cluster.address)
    assert run.returncode == 0, run.stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    assert not (out / ".lora-merge-staging").exists(), "the converted adapter is removed once published"

    # A pickle that would run code is refused by torch.load(weights_only=True) and nothing runs.
    (adapter / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/pwned-allowed'\ntR.")
    code = main(["merge", "--base", models.base, "--adapter", str(adapter), "--output", str(tmp_path / "o2"),
                 "--allow-pickle"])
    assert code == 2 and not os.path.exists("/tmp/pwned-allowed")
    assert "adapter_model.bin: is not a plain pickle of tensors" in capsys.readouterr().err
