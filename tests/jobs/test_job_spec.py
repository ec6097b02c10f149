"""Job specs (--config) and submission through Ray Jobs to a running cluster."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from jobs.cli import main
from tests.jobs.conftest import cli
from tests.reference import assert_bit_identical, load_checkpoint

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def write_spec(path, **values) -> str:
    import yaml
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_a_job_spec_supplies_every_option_and_flags_override_it(models, ray_session, tmp_path):
    cluster, _ = ray_session
    spec = write_spec(tmp_path / "job.yaml", base=models.base, adapters=[{"uri": models.adapter, "weight": 1.0}],
                      output=str(tmp_path / "from-spec"), ray_address=cluster.address, device="cpu",
                      report=str(tmp_path / "report.json"))
    run = cli("merge", "--config", spec, "--output", str(tmp_path / "from-flag"))
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "from-spec").exists(), "the flag overrode the file"
    assert_bit_identical(load_checkpoint(str(tmp_path / "from-flag")), models.reference)
    assert (tmp_path / "report.json").exists()


@pytest.mark.parametrize("spec, message", [
    ({"base": "x", "adapter": ["y"], "output": "z"}, "unknown key(s) adapter (known keys: base, adapters,"),
    ({"base": "x", "adapters": ["y"], "output": "z", "overwrite": "yes"}, "overwrite is 'yes', not true or false"),
    ({"base": "x", "adapters": [{"uri": "y", "weight": "heavy"}], "output": "z"}, "weight 'heavy' of y is not a"),
    ({"adapters": ["y"], "output": "z"}, "error: --base: is required (pass --base, or set base in the --config"),
])
def test_bad_job_specs_are_refused_with_one_line(tmp_path, capsys, spec, message):
    code = main(["merge", "--config", write_spec(tmp_path / "job.yaml", **spec)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_json_logs_for_cluster_collectors(tmp_path, capsys):
    import json
    code = main(["merge", "--base", str(tmp_path / "none"), "--adapter", "a", "--output", "o", "--log-format",
                 "json"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    entry = json.loads(line)
    assert code == 2 and entry["level"] == "error" and entry["exit_code"] == 2
    assert entry["message"].endswith("/none: does not exist or is empty (check the path given as --base)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(head: subprocess.Popen, log) -> str:
    """Stop the head started with --block (its whole process group: not `ray stop`, which would stop
    every Ray on the machine) and return what it printed; never raises, so that the test's own
    failure is the one reported."""
    for signum, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
        try:
            os.killpg(head.pid, signum)
            head.wait(timeout=grace)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue
    log.flush()
    return open(log.name, errors="replace").read()[-3000:]


HEAD_TRIES = 3  # a loaded machine may take longer than Ray's fixed 30 s to start a node


def start_head(env: dict, tmp_path) -> tuple[subprocess.Popen, object, str]:
    """`ray start --head --block` on ports of its own for every agent (the other test clusters hold
    Ray's default ones), once it reports itself started and its job API answers: (the head, its log,
    the job API's address). A head that gives up starting its node is started again."""
    token_env = dict(env, RAY_AUTH_MODE="token")
    attempt = 0
    while True:
        attempt += 1
        dashboard_port = free_port()
        log = open(tmp_path / f"head-{attempt}.log", "w")
        head = subprocess.Popen([RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                                 f"--dashboard-agent-listen-port={free_port()}",
                                 f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                                 f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
                                 "--object-store-memory=100000000", "--include-dashboard=true"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        address = f"http://127.0.0.1:{dashboard_port}"
        deadline = time.monotonic() + 90
        while head.poll() is None and time.monotonic() < deadline:
            started = "Ray runtime started." in open(log.name, errors="replace").read()
            if started and subprocess.run([RAY, "job", "list", "--address", address], env=token_env,
                                          capture_output=True).returncode == 0:
                return head, log, address
            time.sleep(1)
        printed = stop_head(head, log)
        if "timed out during startup" not in printed or attempt == HEAD_TRIES:
            raise AssertionError(f"the Ray head did not come up; it printed:\n{printed}")


@pytest.mark.cluster
@pytest.mark.processes
def test_ray_job_submit_runs_a_merge_on_a_running_cluster(models, tmp_path):
    """README's Ray Jobs recipe on a machine where Ray has never run: `ray get-auth-token --generate`,
    `ray start --head`, `RAY_AUTH_MODE=token ray job submit --working-dir . -- lora-merge merge
    --config job.yaml`. HOME is the test's own, so the token is too (and ~/.ray is never read)."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(key, None)
    token = subprocess.run([RAY, "get-auth-token", "--generate"], env=env, capture_output=True, text=True)
    assert token.returncode == 0 and (home / ".ray" / "auth_token").exists(), token.stderr[-2000:]
    head, log, address = start_head(env, tmp_path)
    submit_env = dict(env, RAY_AUTH_MODE="token")
    printed = ""
    try:
        spec = write_spec(tmp_path / "job.yaml", base=models.base, adapters=[models.adapter],
                          output=str(tmp_path / "merged"), ray_address="auto")
        for _ in range(15):  # the head's job agent comes up a little after its API answers
            submit = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", REPO, "--",
                                     "lora-merge", "merge", "--config", spec, "--log-format", "json"],
                                    env=submit_env, capture_output=True, text=True, timeout=600, cwd=REPO)
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout
        assert_bit_identical(load_checkpoint(str(tmp_path / "merged")), models.reference)
    except BaseException as failure:
        printed = stop_head(head, log) or "(nothing)"
        raise AssertionError(f"{failure}; the Ray head printed:\n{printed}") from failure
    finally:
        if not printed:
            stop_head(head, log)
