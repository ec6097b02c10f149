"""Exactly once, even when jobs overlap (issue 26): one writer per output, a claim taken over only
when its holder is gone, a finished merge re-run doing nothing, retries that wait and say why."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest

from merge_core.names import CLAIM_NAME, INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from tests.jobs.conftest import cli
from tests.jobs.test_cli_errors import one_error_line
from tests.jobs.test_interrupts import Held
from tests.reference import assert_bit_identical, load_checkpoint

pytestmark = pytest.mark.processes  # the holders are processes of their own, held and killed


def args_for(models, out, *extra) -> tuple[str, ...]:
    return ("--base", models.base, "--adapter", models.adapter, "--output", str(out), *extra)


def killed_at(point: str, models, out, tmp_path, cluster) -> Held:
    """A run of its own SIGKILLed while held at `point`."""
    run = Held(tmp_path, (*args_for(models, out), "--ray-address", cluster.address), point)
    run.wait_paused(point)
    run.job.kill()
    run.finish()
    return run


def snapshot(out) -> dict[str, tuple[int, int]]:
    return {n: (os.stat(out / n).st_size, os.stat(out / n).st_mtime_ns) for n in sorted(os.listdir(out))}


def test_a_second_job_is_refused_while_the_first_holds_the_output(models, ray_session, tmp_path):
    cluster, _ = ray_session
    out = tmp_path / "out"
    first = Held(tmp_path, (*args_for(models, out), "--ray-address", cluster.address), "journal-written")
    first.wait_paused("journal-written")
    holder = json.loads((out / CLAIM_NAME).read_text())
    assert holder["pid"] == first.job.pid and holder["host"] == socket.gethostname()
    for extra in ((), ("--resume",), ("--overwrite",)):
        line = one_error_line(cli("merge", *args_for(models, out), *extra))
        assert line.startswith(f"error: {out}/{CLAIM_NAME}: another job is writing this output: run {holder['run']} "
                               f"(merge, pid {first.job.pid} on {socket.gethostname()}, since ")
        assert line.endswith("unless it renews it (wait for it to finish, or choose another --output)")
    first.release("journal-written")
    code, stderr = first.finish()
    assert code == 0, stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    assert not (out / CLAIM_NAME).exists() and not (out / JOURNAL_NAME).exists()


def test_a_dead_holders_claim_is_taken_over_by_resume_only(models, ray_session, tmp_path):
    """On this host a dead holder is seen at once; on another host only when its lease has ended."""
    cluster, _ = ray_session
    out = tmp_path / "out"
    killed_at("journal-written", models, out, tmp_path, cluster)
    line = one_error_line(cli("merge", *args_for(models, out)))
    assert line == (f"error: {out}: the output holds an unfinished merge (1 file) (pass --resume to finish it, "
                    "--overwrite to start over, or choose an empty --output)")

    claim = json.loads((out / CLAIM_NAME).read_text())
    (out / CLAIM_NAME).write_text(json.dumps(claim | {"host": "node-7", "until": time.time() + 4}))
    live = one_error_line(cli("merge", *args_for(models, out, "--resume")))
    assert "another job is writing this output" in live and "on node-7" in live
    time.sleep(4)
    taken = cli("merge", *args_for(models, out, "--resume"))
    assert taken.returncode == 0, taken.stderr
    assert f"taking over {out} from run {claim['run']} (merge, pid {claim['pid']} on node-7" in taken.stderr
    assert "its lease ended at" in taken.stderr
    assert_bit_identical(load_checkpoint(str(out)), models.reference)


def test_a_finished_merge_run_again_does_nothing_and_tidies_a_stale_journal(models, ray_session, tmp_path):
    """The driver killed between the index and the journal's removal: the model is complete, and
    the next run (plain or --resume) says so, exits 0, removes the stale journal and writes nothing."""
    cluster, _ = ray_session
    out = tmp_path / "out"
    killed_at("index-written", models, out, tmp_path, cluster)
    assert (out / INDEX_NAME).exists() and (out / JOURNAL_NAME).exists()
    before = snapshot(out)

    again = cli("merge", *args_for(models, out))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"{out}: already complete: its manifest records this very merge (the same "
                                    "inputs and settings); nothing was written")
    assert snapshot(out) == {n: v for n, v in before.items() if n not in (JOURNAL_NAME, CLAIM_NAME)}
    resumed = cli("merge", *args_for(models, out, "--resume"))
    assert resumed.returncode == 0 and "already complete" in resumed.stdout
    assert snapshot(out) == {n: v for n, v in before.items() if n not in (JOURNAL_NAME, CLAIM_NAME)}
    other = one_error_line(cli("merge", *args_for(models, out, "--weight", "0.5")))
    assert other == (f"error: {out}/{INDEX_NAME}: the output already holds a finished model of other inputs or "
                     "settings (pass --overwrite to replace it, or choose another --output)")
    assert_bit_identical(load_checkpoint(str(out)), models.reference)
    assert json.loads((out / MANIFEST_NAME).read_text())["fingerprint"]
