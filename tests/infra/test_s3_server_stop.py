"""Stopping the local S3 server returns only once it is gone, so that a start on its ports and data
folder may follow at once (as the store-outage tests do), even when it ignores SIGTERM."""

import subprocess
import sys
import time

from lora_merge import s3_server

STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def test_a_server_that_ignores_sigterm_is_killed_reaped_and_counted_as_gone(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout.readline() == b"up\n"  # its SIGTERM handler is in place
    server = s3_server.S3Server(endpoint="http://127.0.0.1:1", access_key="a", secret_key="s", pid=process.pid,
                                data_dir=str(tmp_path))
    started = time.monotonic()
    s3_server.stop(server, timeout=0.5)
    assert time.monotonic() - started < 5
    assert process.poll() is not None, "stop returned while the server still ran"
    assert not s3_server._alive(process.pid), "a zombie must not count as a running server"
