"""The bench's target lines: which targets a run's kind can judge, and the verdict from its medians."""

import argparse

from bench.targets import LOCAL, verdicts


def run_kind(**given) -> argparse.Namespace:
    return argparse.Namespace(**({"batch": None, "moe": None, "demo": False, "storage": "local", "device": "cpu",
                                  "quantized": None} | given))


def test_a_local_run_is_judged_against_peft_and_the_copy():
    wall = {"copy (cp -r)": 6.0, "PEFT": 44.0, "lora-merge": 13.0, "lora-merge, fp8": 30.0}
    peak = {"copy (cp -r)": 0.0, "PEFT": 5e9, "lora-merge": 1.7e9, "lora-merge, fp8": 1.8e9}
    lines = verdicts(run_kind(quantized="fp8"), wall, peak)
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["met", "NOT met", "met", "NOT met"]
    assert "0.30x (at most 0.3x)" in lines[0] and "0.34x" in lines[1] and "2.31x" in lines[3]


def test_s3_demo_and_gpu_runs_have_their_own_targets():
    assert verdicts(run_kind(storage="s3", targets="q_proj,v_proj"), {"boto3 copy": 10.0, "lora-merge": 4.0},
                    {})[0].endswith("q_proj and v_proj only, against a boto3 download + upload: 0.40x (at most "
                                    "0.5x): met")
    assert "every linear" in verdicts(run_kind(storage="s3"), {"boto3 copy": 10.0, "lora-merge": 14.0}, {})[0]
    assert verdicts(run_kind(demo=True, storage="s3"), {"boto3 copy": 1.0, "lora-merge": 7.5}, {}) == [
        "target: lora-merge: the demo's 40 MB merge, S3 to S3, from the command's start to its exit: 7.50 s "
        "(at most 5 s): NOT met"]
    gpu = verdicts(run_kind(device="cuda"), {"copy (cp -r)": 10.0, "PEFT": 30.0, "lora-merge": 14.0}, {})
    assert len(gpu) == 2 and gpu[0].endswith("0.47x (at most 0.5x): met") and "1.40x (at most 1.5x): met" in gpu[1]
    assert verdicts(run_kind(batch=3), {"lora-merge": 1.0}, {}) == []


def test_each_executor_that_ran_is_judged_on_its_own():
    wall = {"copy (cp -r)": 4.0, "PEFT": 43.0, "lora-merge": 22.0, LOCAL: 12.0}
    peak = {"copy (cp -r)": 0.0, "PEFT": 4.8e9, "lora-merge": 1.9e9, LOCAL: 0.9e9}
    lines = verdicts(run_kind(), wall, peak)
    assert [line.split(": ")[1] for line in lines] == ["lora-merge"] * 3 + [LOCAL] * 3
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["NOT met", "NOT met", "NOT met", "met", "met", "NOT met"]
    demo = verdicts(run_kind(demo=True, storage="s3"), {"boto3 copy": 1.0, "lora-merge": 11.0, LOCAL: 3.0}, {})
    assert [line.rsplit(": ", 1)[1] for line in demo] == ["NOT met", "met"]
