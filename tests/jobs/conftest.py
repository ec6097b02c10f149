"""Ray for the job tests: a simulated two-node cluster, one node with a logical GPU, that this
test process joins, so that the command (jobs.cli.main) and the Python API run in-process on
warm workers; `run_cli` starts the command as a process of its own, for the tests that must kill
or stop it."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import pytest
import torch

from tests.reference import MEDIUM, make_adapter, make_base, peft_merged

OBJECT_STORE_BYTES = 80 * 1024 * 1024
LORA_MERGE = os.path.join(os.path.dirname(sys.executable), "lora-merge")


@dataclass(frozen=True)
class Models:
    base: str
    adapter: str
    reference: dict[str, torch.Tensor]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("models")
    base = make_base(str(root / "base"), "qwen2", max_shard_size="40KB")
    (root / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    adapter = make_adapter(str(root / "adapter"), "qwen2", r=4, lora_alpha=8, use_rslora=True)
    return Models(base, adapter, peft_merged(base, adapter, str(root / "peft"), "qwen2"))


@pytest.fixture(scope="session")
def medium(tmp_path_factory) -> Models:
    """Shards of about 9 MB: with 5 MiB parts each goes up as a multipart upload, open for a while."""
    root = tmp_path_factory.mktemp("medium")
    base = make_base(str(root / "base"), max_shard_size="12MB", **MEDIUM)
    adapter = make_adapter(str(root / "adapter"), sizes=MEDIUM, r=16, lora_alpha=32)
    return Models(base, adapter, peft_merged(base, adapter, str(root / "peft")))


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory) -> Models:
    """16 shards of up to 1 MB, so that a job is still running when a test strikes."""
    root = tmp_path_factory.mktemp("many")
    sizes = MEDIUM | {"vocab_size": 2048}
    base = make_base(str(root / "base"), max_shard_size="500KB", **sizes)
    adapter = make_adapter(str(root / "adapter"), sizes=sizes)
    return Models(base, adapter, peft_merged(base, adapter, str(root / "peft")))


@pytest.fixture(scope="session")
def two_node_cluster(s3):
    """Depends on the S3 server so that its nodes (and their workers) inherit the AWS settings."""
    from ray.cluster_utils import Cluster

    from jobs.ray_executor import LOCAL_SYSTEM_CONFIG

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES,
                                                            "_system_config": LOCAL_SYSTEM_CONFIG})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    yield cluster, gpu_node
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_session(two_node_cluster):
    """This process joined to the two-node cluster: `cli(...)` and the API run their tasks there."""
    import ray

    cluster, _ = two_node_cluster
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield two_node_cluster
    ray.shutdown()


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`lora-merge ARGS` as a process of its own (a local Ray of its own unless --ray-address)."""
    return subprocess.run([LORA_MERGE, *args], capture_output=True, text=True, timeout=timeout, env=env)


def cli(*args: str) -> subprocess.CompletedProcess:
    """`lora-merge ARGS` in this process (jobs.cli.main, on the Ray this process joined): the same
    exit code, stdout and stderr as the command, without a process and a Ray start per call."""
    from jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's usage errors and --help
            code = stop.code
    logging.getLogger().handlers.clear()  # main's handler writes to `err`, which is gone now
    return subprocess.CompletedProcess(["lora-merge", *args], code, out.getvalue(), err.getvalue())


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Beside:
    """`action` on a thread of its own while the test's main thread runs a merge in-process;
    `result()` joins it and raises what it raised."""

    def __init__(self, action):
        self.failure: BaseException | None = None

        def run():
            try:
                action()
            except BaseException as exc:  # re-raised in the test's thread
                self.failure = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the action beside the merge did not finish"
        if self.failure:
            raise self.failure
