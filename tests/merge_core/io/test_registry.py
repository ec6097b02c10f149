"""Opening storage by URI: one backend per scheme, each opened once per process, boto3 only for s3://."""

from __future__ import annotations

import subprocess
import sys

import pytest

from merge_core.errors import InputError
from merge_core.io.local import LocalStorage
from merge_core.io.registry import open_storage
from merge_core.io.storage import StorageOptions


def test_a_local_path_opens_once_per_process(tmp_path):
    first = open_storage(str(tmp_path))
    assert isinstance(first, LocalStorage) and open_storage(str(tmp_path)) is first
    assert open_storage(str(tmp_path), StorageOptions(part_size=8 << 20)) is not first, "other options, other one"


def test_an_unknown_scheme_is_refused_naming_the_known_ones():
    with pytest.raises(InputError) as error:
        open_storage("gs://bucket/model")
    assert str(error.value) == "gs://bucket/model: unsupported URI scheme 'gs' (use a local path or s3://)"


def test_the_driver_and_local_storage_never_load_boto3(tmp_path):
    code = ("import sys; import jobs.driver, jobs.verify_job, jobs.plan_view; from merge_core.io.registry import "
            f"open_storage; open_storage({str(tmp_path)!r}).list_names(); "
            "print('boto3' in sys.modules, 'torch' in sys.modules)")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == ["False", "False"], "neither boto3 nor torch in the driver for local paths"
