"""The `lora-merge` command line. Exit codes: 0 ok, 2 bad input, 3 runtime failure, 4 validation failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Sequence

from jobs.options import (
    MergeOptions,
    PlanOptions,
    ReportOptions,
    UnmergeOptions,
    VerifyOptions,
    add_flags,
    build,
    defaults,
    given,
    required,
    spec_keys,
)
from merge_core.errors import InputError, ValidationError
from merge_core.publish.manifest import tool_version

EXIT_OK, EXIT_INPUT, EXIT_RUNTIME, EXIT_VALIDATION = 0, 2, 3, 4
EXIT_CODES = """exit codes: 0 done; 2 bad input (one line naming the file or tensor and the fix; nothing
written); 3 runtime failure after retries, or stopped by SIGTERM (no index written; --resume
finishes it); 4 validation failed (no index written; the problems are listed); 130 stopped by
Ctrl-C (--resume finishes it)"""

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
    "unmerge": """examples:
  lora-merge unmerge --merged ./merged --adapter ./my-lora --output ./unmerged
  lora-merge unmerge --merged s3://models/llama-a --adapter s3://loras/a --output s3://models/llama --base s3://orig""",
    "report": """examples:
  lora-merge report ./merged
  lora-merge report s3://models/llama-a --png report.png --html s3://models/llama-a/merge_report.html""",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors are bad input too: exit 2, one line
        self.exit(EXIT_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# command → (its options, one-line summary, whether it takes --config)
COMMAND_OPTIONS = {
    "merge": (MergeOptions, "fuse adapters into a base checkpoint and publish the result", True),
    "verify": (VerifyOptions, "re-check a merged model against its base and adapters, byte for byte", False),
    "plan": (PlanOptions, "show what a merge would read, fuse and write; reads headers only, writes nothing", False),
    "report": (ReportOptions, "show what a merge changed: a summary, and a heatmap as PNG or HTML", False),
    "unmerge": (UnmergeOptions, "take adapters back out of a merged model, as PEFT's unmerge_adapter() does", True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-merge", description="Merge LoRA adapters into a large checkpoint, shard by shard, "
                     "on a Ray cluster.", epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lora-merge {tool_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (options, summary, configurable) in COMMAND_OPTIONS.items():
        sub = commands.add_parser(name, help=summary, description=summary, epilog=f"{EXAMPLES[name]}\n\n{EXIT_CODES}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if configurable:
            sub.add_argument("--config", metavar="FILE", help="take options from this YAML job spec (local or "
                             "s3://); flags given here override it")
        add_flags(sub, options, from_config=configurable)
        sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sub.add_argument("--log-format", choices=("text", "json"), default="text",
                         help="json: one JSON object per log line, for cluster log collectors")
    return parser


def resolve_options(args: argparse.Namespace):
    """The command's options: defaults, then the --config file, then the flags given."""
    options_type = COMMAND_OPTIONS[args.command][0]
    values = defaults(options_type)
    if getattr(args, "config", None):
        from jobs.job_config import load_job_config

        values.update(load_job_config(args.config, spec_keys(options_type)))
    flags = given(args, options_type)
    if "adapters" in flags:  # adapters on the command line replace the file's, weights with them
        flags.setdefault("weights", [])
    values.update(flags)
    for name, flag in required(options_type).items():
        if not values.get(name):
            raise InputError(flag, "is required", f"pass {flag}, or set {name} in the --config file")
    return build(options_type, values)


def _merge(options: MergeOptions) -> int:
    from jobs.api import run
    from jobs.progress import summary_table

    summary = run(options)
    rows = [
        ("output", summary.output),
        ("shards", f"{summary.shards} ({summary.tensors} tensors)"),
        ("fused tensors", str(summary.fused_tensors)),
        ("read", f"{summary.bytes_read / 1e9:.3f} GB"),
        ("written", f"{summary.bytes_written / 1e9:.3f} GB"),
        ("wall time", f"{summary.seconds:.1f} s ({summary.gb_per_second:.2f} GB/s written)"),
        ("nodes", f"{len(summary.nodes)}, device {summary.device}"),
        ("retries", str(summary.retries)),
        ("reused shards", f"{summary.reused} (--resume)" if options.resume else "0"),
        ("validated", "yes: headers, index, sizes (sha256 read-back on object stores), NaN/Inf, float64 spot check"
         if summary.validated else "no (--no-validate)"),
    ]
    recovered = summary.manifest.get("recovery")
    if recovered:
        share = recovered["elements_identical"] / max(1, recovered["elements"])
        rows.append(("came back bit for bit", f"{recovered['tensors_identical']} of {recovered['tensors']} tensors, "
                     f"{share:.1%} of elements; the rest within {recovered['max_ulps']} ulp of "
                     f"{recovered['original']}"))
    if summary.adapter_kept:
        rows.append(("adapter kept", summary.adapter_kept))
    print(summary_table(rows))
    for where in summary.pictures:
        print(f"report picture: {where}")
    return EXIT_OK


def _verify(options: VerifyOptions) -> int:
    from jobs.api import write_json
    from jobs.verify_job import run_verify

    summary = run_verify(options)
    if summary.problems:
        raise ValidationError(summary.problems)
    print(f"verified {summary.merged}: {summary.shards} shards, {summary.tensors_checked} tensors, "
          f"{summary.bytes_checked / 1e9:.3f} GB re-read; no problems")
    write_json(options.report, vars(summary))
    return EXIT_OK


def _report(options: ReportOptions) -> int:
    from jobs.api import report

    shown = report(options.merged_uri, png=options.png, html=options.html)
    print("\n".join([shown.text, *(f"wrote {where}" for where in shown.written)]))
    return EXIT_OK


def _plan(options: PlanOptions) -> int:
    from jobs.plan_view import run_plan

    planned = run_plan(options)
    print(json.dumps(planned.data, indent=2) if options.json else planned.text)
    return EXIT_OK


COMMANDS = {"merge": _merge, "verify": _verify, "plan": _plan, "report": _report, "unmerge": _merge}


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
    options = None
    try:
        options = resolve_options(args)
        return COMMANDS[args.command](options)
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
        from jobs.api import write_json

        write_json(getattr(options, "report", None), {"problems": problems})
    return code


def _classify(exc: BaseException) -> tuple[int, str]:
    cause = getattr(exc, "cause", None)  # what a Ray task raised, without Ray's remote traceback
    if isinstance(cause, BaseException):
        exc = cause
    if isinstance(exc, InputError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_VALIDATION, f"validation failed: {exc}"
    if isinstance(exc, KeyboardInterrupt):  # a stopped merge says how far it got (jobs.runner.Interrupted)
        return getattr(exc, "exit_code", 130), str(exc) if hasattr(exc, "exit_code") else "interrupted"
    if isinstance(exc, SystemExit):
        raise exc
    return EXIT_RUNTIME, f"{type(exc).__name__}: {_first_line(exc)}"  # after the driver's retries


def _first_line(exc: BaseException) -> str:
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return text[0] if text else repr(exc)


if __name__ == "__main__":
    sys.exit(main())
