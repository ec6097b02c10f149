"""`lora-merge report` and `merge --report-png` through the command line, on a real merge."""

from __future__ import annotations

import struct

from tests.conftest import BUCKET
from tests.jobs.conftest import cli


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_merge_draws_its_picture_and_report_shows_it_again(models, s3, ray_session, tmp_path):
    cluster, _ = ray_session
    out, picture = tmp_path / "merged", tmp_path / "merge_report.png"
    run = cli("merge", "--base", models.base, "--adapter", models.adapter, "--output", str(out),
                  "--ray-address", cluster.address, "--report-png", str(picture))
    assert run.returncode == 0, run.stderr
    assert f"report picture: {picture}" in run.stdout
    assert png_size(picture.read_bytes())[0] == 1000

    page = f"s3://{BUCKET}/report/merge_report.html"
    shown = cli("report", str(out), "--html", page, "--png", str(tmp_path / "again.png"))
    assert shown.returncode == 0, shown.stderr
    assert models.adapter in shown.stdout and "changed most" in shown.stdout
    assert "touched q, k, v, o, gate, up, down" in shown.stdout
    html = s3.client().get_object(Bucket=BUCKET, Key="report/merge_report.html")["Body"].read().decode()
    assert "data:image/png;base64," in html and "src=\"http" not in html
    assert png_size((tmp_path / "again.png").read_bytes()) == png_size(picture.read_bytes())


def test_report_of_something_that_is_no_merge_is_one_line(tmp_path):
    run = cli("report", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip() == (f"error: {tmp_path}/merge_report.parquet: not found: this is not the output of a "
                                  "finished lora-merge run (point at a directory or prefix lora-merge merged into)")
