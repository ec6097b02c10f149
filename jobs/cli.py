"""The `lora-merge` command line. Exit codes: 0 ok, 2 bad input, 3 runtime failure, 4 validation failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from typing import Sequence

from merge_core.errors import InputError, ValidationError
from merge_core.manifest import tool_version
from merge_core.storage import DEFAULT_PART_BYTES, StorageOptions

EXIT_OK, EXIT_INPUT, EXIT_RUNTIME, EXIT_VALIDATION = 0, 2, 3, 4

MERGE_EXAMPLES = """examples:
  lora-merge merge --base ./Llama-3.1-8B --adapter ./my-lora --output ./merged
  lora-merge merge --base ./base --adapter ./a --adapter ./b --weight 0.7 --weight 0.3 --output ./merged
  lora-merge merge --base ./base --adapter ./a --output ./merged --overwrite --ray-address auto

exit codes: 0 merged, 2 bad input (nothing written), 3 runtime failure after retries
(no index written), 4 the merged output failed validation (no index written)"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors are bad input too: exit 2, one line
        self.exit(EXIT_INPUT, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-merge", description="Merge LoRA adapters into a large checkpoint, shard by shard, "
                     "on a Ray cluster.")
    parser.add_argument("--version", action="version", version=f"lora-merge {tool_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    merge = commands.add_parser("merge", help="fuse adapters into a base checkpoint and publish the result",
                                epilog=MERGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("--base", required=True, metavar="URI",
                       help="base checkpoint directory (model.safetensors or an index with shards)")
    merge.add_argument("--adapter", required=True, action="append", metavar="URI", dest="adapters",
                       help="PEFT adapter directory; repeat to merge several")
    merge.add_argument("--weight", action="append", type=float, metavar="W", dest="weights", default=[],
                       help="weight of the adapter in the same position (default 1)")
    merge.add_argument("--output", required=True, metavar="URI", help="where to write the merged checkpoint")
    merge.add_argument("--overwrite", action="store_true", help="replace a model already at --output")
    merge.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to fuse: cuda needs GPUs in the cluster; auto uses them when present")
    merge.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    merge.add_argument("--part-size-mb", type=int, default=DEFAULT_PART_BYTES // 2**20, metavar="MB",
                       help="multipart upload part size for s3:// output (default %(default)s, at least 5)")
    merge.add_argument("--report", metavar="FILE", help="also write the run's summary as JSON to FILE")
    merge.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    return parser


def _summary_lines(summary) -> list[str]:
    return [
        f"merged {summary.fused_tensors} tensors in {summary.shards} shards into {summary.output}",
        f"wrote {summary.bytes_written / 1e9:.2f} GB in {summary.seconds:.1f} s "
        f"({summary.gb_per_second:.2f} GB/s) on {len(summary.nodes)} node(s), device {summary.device}",
    ]


def _merge(args: argparse.Namespace) -> int:
    from jobs.driver import MergeOptions, run_merge  # imports Ray: only for commands that need it

    summary = run_merge(MergeOptions(base=args.base, adapters=args.adapters, output=args.output,
                                     weights=args.weights, overwrite=args.overwrite, device=args.device,
                                     ray_address=args.ray_address,
                                     storage=StorageOptions(part_size=args.part_size_mb * 2**20)))
    print("\n".join(_summary_lines(summary)))
    if args.report:
        report = {k: v for k, v in vars(summary).items() if k != "manifest"}
        report["gb_per_second"] = summary.gb_per_second
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        return _merge(args)
    except BaseException as exc:  # every failure leaves as one line and an exit code
        code, message = _classify(exc)
        if args.debug:
            traceback.print_exception(exc)
    print(f"error: {message}", file=sys.stderr)
    return code


def _classify(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, InputError):
        return EXIT_INPUT, str(exc)
    if isinstance(exc, ValidationError):
        return EXIT_VALIDATION, f"validation failed: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, SystemExit):
        raise exc
    return EXIT_RUNTIME, f"{type(exc).__name__}: {_first_line(exc)}"  # after Ray's retries


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else repr(exc)


if __name__ == "__main__":
    sys.exit(main())
