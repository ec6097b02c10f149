"""lora-merge from Python.

    import lora_merge

    summary = lora_merge.merge("s3://models/llama-70b", "s3://adapters/support/v12",
                               "s3://models/llama-70b-support-v12", ray_address="auto")
    print(summary.fused_tensors, summary.output)

batch writes several merged models from one read of the base:

    outcome = lora_merge.batch("s3://models/llama-70b", [
        {"output": "s3://models/llama-70b-support", "adapters": ["s3://adapters/support/v12"]},
        {"output": "s3://models/llama-70b-sales", "adapters": ["s3://adapters/sales/v3"], "dequantize": True}])
    assert outcome.ok, [str(o.error) for o in outcome.failed]

merge, unmerge, verify, plan, report and batch take the command line's options as keywords (the long
flags with underscores: overwrite=True, device="cpu", combine="ties", ...), with the same defaults,
and return typed results; bad input raises InputError, whose message is the line the command
prints after "error: ". A merge runs on the Ray cluster this process has joined, else the one at
`ray_address`, else a local Ray started for it; with executor="local", on threads of this process
without Ray (one machine's CPUs, no start-up).
"""

from jobs.api import ReportSummary, batch, merge, plan, plan_batch, report, unmerge, verify
from jobs.batch import BatchSummary, OutputOutcome
from jobs.driver import MergeSummary
from jobs.plan_view import BatchPlanSummary, PlanSummary
from jobs.progress import ProgressEvent
from jobs.runner import Interrupted
from jobs.verify_job import VerifySummary
from merge_core.errors import InputError, TransientStorageError, ValidationError
from merge_core.publish.manifest import tool_version

__version__ = tool_version()
__all__ = ["BatchPlanSummary", "BatchSummary", "InputError", "Interrupted", "MergeSummary", "OutputOutcome",
           "PlanSummary", "ProgressEvent", "ReportSummary", "TransientStorageError", "ValidationError", "VerifySummary",
           "batch", "merge", "plan", "plan_batch", "report", "unmerge", "verify"]
