"""The performance targets (issue 25), each judged from one side-by-side run of the bench: a line
per target that applies to the run's kind, met or not, with the measured ratio.

Wall-time targets are ratios to what ran beside lora-merge in the same rounds (a copy of the
same bytes, PEFT's merge), so that a noisy machine hurts both sides alike; the demo's is absolute.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping

MERGE = "lora-merge"
LOCAL = "lora-merge --executor local"  # the same merge on threads of its own process, no Ray
Q_AND_V = {"q_proj", "v_proj"}


@dataclass(frozen=True)
class Target:
    what: str  # the target, in words
    measured: float  # the ratio (or seconds) the run measured
    bound: float  # at most this
    unit: str = "x"

    def line(self) -> str:
        verdict = "met" if self.measured <= self.bound else "NOT met"
        return f"target: {self.what}: {self.measured:.2f}{self.unit} (at most {self.bound:g}{self.unit}): {verdict}"


def targets(args: argparse.Namespace, wall: Mapping[str, float], peak: Mapping[str, float]) -> list[Target]:
    """The targets this run can judge, for each of lora-merge's executors it ran: `wall` and `peak`
    are the medians by method name."""
    if args.batch or args.moe:
        return []
    found: list[Target] = []
    for merge in (m for m in (MERGE, LOCAL) if m in wall):
        found += [Target(f"{merge}: {t.what}", t.measured, t.bound, t.unit) for t in _targets(args, merge, wall, peak)]
    return found


def _targets(args: argparse.Namespace, merge: str, wall: Mapping[str, float],
             peak: Mapping[str, float]) -> list[Target]:
    if args.demo:
        return [Target("the demo's 40 MB merge, S3 to S3, from the command's start to its exit", wall[merge], 5.0,
                       " s")]
    if args.storage == "s3":
        chosen = set((getattr(args, "targets", None) or "").split(",")) - {""}  # --targets q_proj,v_proj
        only_q_v = bool(chosen) and chosen <= Q_AND_V
        return [Target(f"S3 to S3, an adapter on {'q_proj and v_proj only' if only_q_v else 'every linear'}, "
                       "against a boto3 download + upload", wall[merge] / wall["boto3 copy"], 0.5 if only_q_v else 1.3)]
    found: list[Target] = []
    copy, peft = wall.get("copy (cp -r)"), wall.get("PEFT")
    on_gpu = args.device == "cuda"
    if peft:
        found.append(Target(f"wall time against PEFT's merge_and_unload{' on the same GPU' if on_gpu else ''}",
                            wall[merge] / peft, 0.5 if on_gpu else 0.3))
        if not on_gpu:
            found.append(Target("peak memory against PEFT's", peak[merge] / peak["PEFT"], 0.3))
    if copy:
        found.append(Target("wall time against cp -r + sync", wall[merge] / copy, 1.5 if on_gpu else 2.5))
    if merge == MERGE and args.quantized == "fp8" and f"{MERGE}, fp8" in wall:
        found.append(Target("FP8 block-scaled against the dense merge of the same model",
                            wall[f"{MERGE}, fp8"] / wall[MERGE], 2.0))
    return found


def verdicts(args: argparse.Namespace, wall: Mapping[str, float], peak: Mapping[str, float]) -> list[str]:
    return [target.line() for target in targets(args, wall, peak)]
