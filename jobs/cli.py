"""The `lora-merge` command line. Exit codes: 0 ok, 2 bad input, 3 runtime failure, 4 validation failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Sequence

from merge_core.errors import InputError, ValidationError
from merge_core.io.storage import DEFAULT_PART_BYTES, StorageOptions
from merge_core.numerics.combine import COMBINE_METHODS
from merge_core.publish.manifest import tool_version

EXIT_OK, EXIT_INPUT, EXIT_RUNTIME, EXIT_VALIDATION = 0, 2, 3, 4
EXIT_CODES = """exit codes: 0 done; 2 bad input (one line naming the file or tensor and the fix; nothing
written); 3 runtime failure after retries (no index written); 4 validation failed (no index
written; the problems are listed)"""

EXAMPLES = {
    "merge": """examples:
  lora-merge merge --base ./Llama-3.1-8B --adapter ./my-lora --output ./merged
  lora-merge merge --base s3://models/llama --adapter s3://loras/a --output s3://models/llama-a
  lora-merge merge --base ./base --adapter ./a --adapter ./b --weight 0.7 --weight 0.3 --output ./merged
  lora-merge merge --base ./base --adapter ./a --output ./merged --overwrite --ray-address auto""",
    "verify": """examples:
  lora-merge verify --base ./Llama-3.1-8B --adapter ./my-lora --merged ./merged
  lora-merge verify --base s3://models/llama --adapter s3://loras/a --merged s3://models/llama-a""",
    "plan": """examples:
  lora-merge plan --base ./Llama-3.1-8B --adapter ./my-lora
  lora-merge plan --base s3://models/llama-405b --adapter s3://loras/a --json""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors are bad input too: exit 2, one line
        self.exit(EXIT_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _inputs(parser: argparse.ArgumentParser, from_config: bool = False) -> None:
    """The options every command shares. With from_config, nothing is required or defaulted here:
    values come from --config, then from the flags, then from MERGE_DEFAULTS."""
    required, unset = not from_config, from_config
    parser.add_argument("--base", required=required, metavar="URI",
                        help="base checkpoint: a directory or s3://bucket/prefix holding model.safetensors or "
                             "model.safetensors.index.json with its shards")
    parser.add_argument("--adapter", required=required, action="append", metavar="URI", dest="adapters",
                        help="PEFT adapter directory or prefix; repeat to merge several")
    parser.add_argument("--weight", action="append", type=float, metavar="W", dest="weights",
                        default=None if unset else [],
                        help="weight of the adapter in the same position (default 1)")
    parser.add_argument("--sequential", action="store_true", default=None if unset else False,
                        help="merge several adapters one after another, rounding after each, in the order given: "
                             "bit-identical to PEFT's merge_and_unload(adapter_names=[...]) (default: W + Σ wᵢ·ΔWᵢ, "
                             "rounded once)")
    parser.add_argument("--combine", choices=COMBINE_METHODS, default=None,
                        help="combine the adapters' full deltas per tensor: ties, dare_linear, dare_ties or "
                             "magnitude_prune (see README.md, Several adapters)")
    parser.add_argument("--density", type=float, default=None if unset else 1.0, metavar="D",
                        help="with --combine: the fraction of each delta kept, 0 < D <= 1 (default 1)")
    parser.add_argument("--seed", type=int, default=None if unset else 0,
                        help="with --combine dare_*: the seed of the random masks (default 0)")
    parser.add_argument("--allow-base-mismatch", action="store_true", default=None if unset else False,
                        help="merge adapters whose configs name different base models")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None if unset else "auto",
                        help="where to fuse: cuda needs GPUs in the cluster; auto uses them when present")
    parser.add_argument("--part-size-mb", type=int, default=None if unset else DEFAULT_PART_BYTES // 2**20,
                        metavar="MB", help=f"multipart upload part size for s3:// output (default "
                        f"{DEFAULT_PART_BYTES // 2**20}, at least 5)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per log line, for cluster log collectors")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-merge", description="Merge LoRA adapters into a large checkpoint, shard by shard, "
                     "on a Ray cluster.", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lora-merge {tool_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, summary: str, from_config: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, epilog=f"{EXAMPLES[name]}\n\n{EXIT_CODES}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _inputs(sub, from_config)
        return sub

    merge = command("merge", "fuse adapters into a base checkpoint and publish the result", from_config=True)
    merge.add_argument("--config", metavar="FILE", help="take options from this YAML job spec (local or s3://); "
                       "flags given here override it")
    merge.add_argument("--output", metavar="URI", help="where to write the merged checkpoint")
    flag = {"action": "store_true", "default": None}
    merge.add_argument("--overwrite", **flag, help="replace whatever is at --output")
    merge.add_argument("--resume", **flag,
                       help="finish an interrupted merge into --output, reusing every shard it proves complete")
    merge.add_argument("--allow-nonfinite", **flag,
                       help="publish even if fusing produced NaN/Inf values the base did not have")
    merge.add_argument("--allow-pickle", **flag,
                       help="accept adapters stored only as adapter_model.bin, loaded with "
                            "torch.load(weights_only=True) (never plain unpickling)")
    merge.add_argument("--no-validate", dest="validate", action="store_false", default=None,
                       help="skip the read-back of shards and the checks before the index is written")
    merge.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    merge.add_argument("--task-cpus", type=int, metavar="N", help="CPUs each shard task asks for (default 1)")
    merge.add_argument("--report", metavar="FILE", help="also write the run's summary as JSON to FILE")

    verify = command("verify", "re-check a merged model against its base and adapters, byte for byte")
    verify.add_argument("--merged", required=True, metavar="URI", help="the merged model to check")
    verify.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    verify.add_argument("--report", metavar="FILE", help="also write the result as JSON to FILE")

    plan = command("plan", "show what a merge would read, fuse and write; reads headers only, writes nothing")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _write_report(path: str | None, report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)


MERGE_DEFAULTS = {"weights": [], "sequential": False, "combine": None, "density": 1.0, "seed": 0,
                  "allow_base_mismatch": False, "device": "auto", "part_size_mb": DEFAULT_PART_BYTES // 2**20, "ray_address": None,
                  "overwrite": False, "resume": False, "allow_nonfinite": False, "allow_pickle": False,
                  "validate": True, "report": None, "task_cpus": 1, "task_resources": {}}


def resolve_merge_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults, then the --config file, then the flags given on the command line."""
    from jobs.job_config import load_job_config

    values = dict(MERGE_DEFAULTS)
    if args.config:
        values.update(load_job_config(args.config))
    given = {k: v for k, v in vars(args).items() if v is not None and k in {*MERGE_DEFAULTS, "base", "output"}}
    if args.adapters is not None:  # adapters on the command line replace the file's, weights with them
        given |= {"adapters": args.adapters, "weights": args.weights or []}
    values.update(given)
    for key, flag in (("base", "--base"), ("adapters", "--adapter"), ("output", "--output")):
        if not values.get(key):
            raise InputError(flag, "is required", f"pass {flag}, or set {key} in the --config file")
    return argparse.Namespace(**(vars(args) | values))


def _arithmetic(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in ("sequential", "combine", "density", "seed", "allow_base_mismatch")}


def _merge(args: argparse.Namespace, storage: StorageOptions) -> int:
    from jobs.driver import MergeOptions, run_merge  # imports Ray: only for commands that need it
    from jobs.progress import summary_table

    summary = run_merge(MergeOptions(base=args.base, adapters=args.adapters, weights=args.weights, **_arithmetic(args),
                                     device=args.device, ray_address=args.ray_address, storage=storage,
                                     output=args.output, overwrite=args.overwrite, resume=args.resume,
                                     allow_nonfinite=args.allow_nonfinite, allow_pickle=args.allow_pickle,
                                     validate=args.validate, task_cpus=args.task_cpus,
                                     task_resources=args.task_resources))
    print(summary_table([
        ("output", summary.output),
        ("shards", f"{summary.shards} ({summary.tensors} tensors)"),
        ("fused tensors", str(summary.fused_tensors)),
        ("read", f"{summary.bytes_read / 1e9:.3f} GB"),
        ("written", f"{summary.bytes_written / 1e9:.3f} GB"),
        ("wall time", f"{summary.seconds:.1f} s ({summary.gb_per_second:.2f} GB/s written)"),
        ("nodes", f"{len(summary.nodes)}, device {summary.device}"),
        ("retries", str(summary.retries)),
        ("reused shards", f"{summary.reused} (--resume)" if args.resume else "0"),
        ("validated", "yes: headers, index, sha256 read-back, NaN/Inf, float64 spot check"
         if summary.validated else "no (--no-validate)"),
    ]))
    report = {k: v for k, v in vars(summary).items() if k != "manifest"}
    _write_report(args.report, report | {"gb_per_second": summary.gb_per_second,
                                         "timings": summary.manifest.get("timings", {})})
    return EXIT_OK


def _verify(args: argparse.Namespace, storage: StorageOptions) -> int:
    from jobs.verify_job import VerifyOptions, run_verify

    summary = run_verify(VerifyOptions(base=args.base, adapters=args.adapters, weights=args.weights, **_arithmetic(args),
                                       device=args.device, ray_address=args.ray_address, storage=storage,
                                       merged=args.merged))
    print(f"verified {summary.merged}: {summary.shards} shards, {summary.tensors_checked} tensors, "
          f"{summary.bytes_checked / 1e9:.3f} GB re-read; no problems")
    _write_report(args.report, vars(summary))
    return EXIT_OK


def _plan(args: argparse.Namespace, storage: StorageOptions) -> int:
    from jobs.driver import MergeInputs
    from jobs.plan_view import run_plan

    text, data = run_plan(MergeInputs(base=args.base, adapters=args.adapters, weights=args.weights, **_arithmetic(args),
                                      device=args.device, storage=storage))
    print(json.dumps(data, indent=2) if args.json else text)
    return EXIT_OK


COMMANDS = {"merge": _merge, "verify": _verify, "plan": _plan}


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower(),
                 "logger": record.name, "message": record.getMessage()}
        return json.dumps(entry | getattr(record, "fields", {}))


def _configure_logging(args: argparse.Namespace) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines() if args.log_format == "json" else logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.debug else logging.INFO)
    for chatty in ("botocore", "boto3", "s3transfer", "urllib3"):  # where credentials were found, etc.
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.debug else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        if args.command == "merge":
            args = resolve_merge_args(args)
        return COMMANDS[args.command](args, StorageOptions(part_size=args.part_size_mb * 2**20))
    except BaseException as exc:  # every failure leaves as one line and an exit code
        failure = exc
        if args.debug:
            traceback.print_exception(exc)
    code, message = _classify(failure)
    problems = failure.problems if isinstance(failure, ValidationError) else []
    if args.log_format == "json":
        logging.getLogger("lora_merge").error(message, extra={"fields": {"exit_code": code, "problems": problems}})
    else:
        print(f"error: {message}", file=sys.stderr)
        for problem in problems:  # one indented line per problem
            print(f"  {problem}", file=sys.stderr)
    if problems:
        _write_report(getattr(args, "report", None), {"problems": problems})
    return code


def _classify(exc: BaseException) -> tuple[int, str]:
    cause = getattr(exc, "cause", None)  # what a Ray task raised, without Ray's remote traceback
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, InputError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_VALIDATION, f"validation failed: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, SystemExit):
        raise exc
    return EXIT_RUNTIME, f"{type(exc).__name__}: {_first_line(exc)}"  # after the driver's retries


def _first_line(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[-1] if text else repr(exc)


if __name__ == "__main__":
    sys.exit(main())
