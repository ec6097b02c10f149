"""The `lora-merge` command line. Exit codes: 0 ok, 2 bad input, 3 runtime failure, 4 validation failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Sequence

from jobs.cli_text import EXAMPLES, EXIT_CODES, OVERVIEW, SUMMARIES
from jobs.options import (
    BatchOptions,
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
PER_OUTPUT = ("each output's own: after its --output, up to the next (given before the first --output, for every "
              "output)")
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors are bad input too: exit 2, one line
        self.exit(EXIT_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# command → (its options, whether it takes --config)
COMMAND_OPTIONS = {
    "merge": (MergeOptions, True),
    "verify": (VerifyOptions, False),
    "plan": (PlanOptions, False),
    "report": (ReportOptions, False),
    "unmerge": (UnmergeOptions, True),
    "batch": (BatchOptions, True),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-merge", description="Merge LoRA adapters into a large checkpoint, shard by shard, "
                     "on a Ray cluster.", epilog=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lora-merge {tool_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (options, configurable) in COMMAND_OPTIONS.items():
        # a batch's --output starts a group of options: no abbreviation may stand for it
        sub = commands.add_parser(name, help=SUMMARIES[name], description=SUMMARIES[name],
                                  epilog=f"{EXAMPLES[name]}\n\n{EXIT_CODES[name]}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=name != "batch")
        if configurable:
            sub.add_argument("--config", metavar="FILE", help="take options from this YAML job spec (local or "
                             "s3://; relative paths in it are from its own folder); flags given here override it")
        add_flags(sub, options, name, from_config=configurable, per_output=PER_OUTPUT if name == "batch" else None)
        sub.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
        sub.add_argument("--log-format", choices=("text", "json"), default="text",
                         help="json: one JSON object per log line, for cluster log collectors")
    return parser


def resolve_options(args: argparse.Namespace, argv: Sequence[str] = ()):
    """The command's options: defaults, then the --config file, then the flags given (`argv`, the
    command line, for a batch's groups of options: jobs.batch_args)."""
    if args.command == "batch":
        from jobs.batch_args import resolve_batch

        return resolve_batch(args, list(argv)[list(argv).index("batch") + 1:])
    options_type = COMMAND_OPTIONS[args.command][0]
    values = defaults(options_type)
    from_file: dict = {}
    if getattr(args, "config", None):
        from jobs.job_config import load_job_config

        from_file = load_job_config(args.config, spec_keys(options_type))
        values.update(from_file)
    flags = given(args, options_type)
    chosen = set(from_file) | set(flags)  # what the user set, for the options a manifest may also record
    if "adapters" in flags:  # adapters on the command line replace the file's, weights with them
        flags.setdefault("weights", [])
    values.update(flags)
    for name, flag in required(options_type).items():
        if not values.get(name):
            raise InputError(flag, "is required", f"pass {flag}, or set {name} in the --config file")
    options = build(options_type, values)
    if args.command in ("verify", "unmerge"):  # how the merged model was made, unless told otherwise
        from jobs.recorded import with_recorded

        options = with_recorded(options, chosen, options.merged if args.command == "verify" else options.checkpoint)
    return options


def _merge(options: MergeOptions) -> tuple[str, dict]:
    from jobs.api import run
    from jobs.progress import merge_rows, summary_table

    summary = run(options)
    if summary.already_complete:
        what = "unmerge" if options.unmerge else "merge"
        text = (f"{summary.output}: already complete: its manifest records this very {what} (the same inputs and "
                "settings); nothing was written")
    else:
        text = "\n".join([summary_table(merge_rows(summary, options.resume)),
                          *(f"report picture: {where}" for where in summary.pictures)])
    return text, {"event": "summary", "command": "unmerge" if options.unmerge else "merge"} | summary.as_dict()


def _verify(options: VerifyOptions) -> tuple[str, dict]:
    from jobs.api import write_json
    from jobs.progress import size_text
    from jobs.verify_job import run_verify

    summary = run_verify(options)
    if summary.problems:
        raise ValidationError(summary.problems)
    write_json(options.report, vars(summary))
    return (f"verified {summary.merged}: {summary.shards} shards, {summary.tensors_checked} tensors, "
            f"{size_text(summary.bytes_checked)} re-read; no problems"), {"event": "verified"} | vars(summary)


def _report(options: ReportOptions) -> tuple[str, dict]:
    from jobs.api import report

    shown = report(options.merged_uri, png=options.png, html=options.html)
    text = "\n".join([shown.text, *(f"wrote {where}" for where in shown.written)])
    return text, {"event": "report", "merged": shown.merged, "summary": shown.text, "written": list(shown.written)}


def _plan(options: PlanOptions) -> tuple[str, dict]:
    from jobs.plan_view import run_plan

    planned = run_plan(options)
    return json.dumps(planned.data, indent=2) if options.json else planned.text, {"event": "plan"} | planned.data


def _batch(options: BatchOptions) -> tuple[str, dict]:
    from jobs.api import run_batch_job
    from jobs.batch import PartlyFailed
    from jobs.plan_view import run_batch_plan
    from jobs.progress import batch_rows, summary_table

    if options.plan:
        planned = run_batch_plan(options)
        return json.dumps(planned.data, indent=2) if options.json else planned.text, {"event": "plan"} | planned.data
    summary = run_batch_job(options)
    text = summary_table(batch_rows(summary))
    data = {"event": "summary", "command": "batch"} | summary.as_dict()
    if not summary.ok:
        raise PartlyFailed(summary, text, data)
    return text, data


COMMANDS = {"merge": _merge, "verify": _verify, "plan": _plan, "report": _report, "unmerge": _merge,
            "batch": _batch}


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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    options = None
    try:
        options = resolve_options(args, argv)
        text, data = COMMANDS[args.command](options)
        print(json.dumps(data, default=str) if args.log_format == "json" else text)
        return EXIT_OK
    except BaseException as exc:  # every failure leaves as one line and an exit code
        failure = exc
        if args.debug:
            traceback.print_exception(exc)
    if getattr(failure, "outcomes", None) is not None:  # a batch some of whose outputs failed
        return _partly_failed(failure, args)
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


def _partly_failed(failure, args: argparse.Namespace) -> int:
    """The outputs that were published, as the summary shows them; one line per failed output,
    `error: OUTPUT: what went wrong`; the exit code of the worst failure (bad input 2, runtime 3,
    validation 4), as a merge of that output alone would have ended."""
    codes = []
    print(json.dumps(failure.data, default=str) if args.log_format == "json" else failure.text)
    for outcome in failure.outcomes:
        code, message = _classify(outcome.error)
        codes.append(code)
        if args.log_format == "json":
            logging.getLogger("lora_merge").error(f"{outcome.output}: {message}", extra={"fields": {
                "exit_code": code, "output": outcome.output}})
        else:
            print(f"error: {outcome.output}: {message}", file=sys.stderr)
            for problem in getattr(outcome.error, "problems", None) or []:  # a validation failure's, indented
                print(f"  {problem}", file=sys.stderr)
    return max(codes)


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
