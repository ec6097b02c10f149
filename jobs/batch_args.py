"""`lora-merge batch` on the command line: the whole job's options, then one group per output, each
starting at its --output and holding that output's own options up to the next --output:

    lora-merge batch --base B --device cpu \\
        --output O1 --adapter A1 \\
        --output O2 --adapter A2 --weight 0.7 --adapter A3 --weight 0.3 --combine ties --density 0.5 \\
        --output O3 --adapter A4 --dequantize

An output's option given before the first --output applies to every output (`--resume` there
resumes them all). The groups given replace a job spec's `outputs`.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

from jobs.job_config import load_job_config
from jobs.options import OUTPUT_ONLY, BatchOptions, add_flags, batch_keys, build, defaults, given, key_of
from merge_core.errors import InputError

OUTPUT_FLAG = "--output"


class _GroupParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # bad input: one line, exit 2
        raise InputError(self.prog, message, "see lora-merge batch --help")


def _output_parser(prog: str) -> argparse.ArgumentParser:
    """The flags of one output (the per_output options), nothing else."""
    parser = _GroupParser(prog=prog, add_help=False, allow_abbrev=False)
    for f in dataclasses.fields(BatchOptions):
        meta = f.metadata
        if not meta.get("per_output") or not meta.get("flag"):
            continue
        kwargs = dict(meta["argparse"])
        if kwargs.get("action") in ("store_true", "store_false"):
            kwargs["default"] = None
        if f.name == "output":
            kwargs.pop("action", None)
        parser.add_argument(meta["flag"], dest=key_of(f), **kwargs)
    return parser


def _job_flags() -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_flags(parser, BatchOptions, "batch", from_config=True)
    per_output = {f.metadata["flag"] for f in dataclasses.fields(BatchOptions) if f.metadata.get("per_output")}
    return {flag for action in parser._actions for flag in action.option_strings} - per_output | {
        "--config", "--debug", "--log-format"}


def split_groups(tokens: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """The tokens before the first --output, and each output's group (its --output first)."""
    prefix: list[str] = []
    groups: list[list[str]] = []
    for token in tokens:
        if token == OUTPUT_FLAG or token.startswith(OUTPUT_FLAG + "="):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            prefix.append(token)
    return prefix, groups


def resolve_batch(args: argparse.Namespace, tokens: Sequence[str]) -> BatchOptions:
    """The batch's options: defaults, the --config file, the job's flags, each output's group.
    `tokens`: the command line after `batch`."""
    prefix, groups = split_groups(tokens)
    values = defaults(BatchOptions)
    if getattr(args, "config", None):
        values.update(load_job_config(args.config, batch_keys()))
    job_keys = {k for k in given(args, BatchOptions)
                if not next(f for f in dataclasses.fields(BatchOptions) if key_of(f) == k).metadata.get("per_output")}
    values.update({k: v for k, v in given(args, BatchOptions).items() if k in job_keys})
    shared, _ = _output_parser("lora-merge batch").parse_known_args(prefix)
    for_all = given(shared, BatchOptions)
    early = sorted(k for k in for_all if k in OUTPUT_ONLY)
    if early:
        flag = next(f.metadata["flag"] for f in dataclasses.fields(BatchOptions) if key_of(f) == early[0])
        raise InputError(flag, "belongs to one output: given before the first --output, it has no output",
                         f"give it after the {OUTPUT_FLAG} it belongs to")
    values.update(for_all)
    if groups:
        values["outputs"] = [_group(group, _job_flags()) for group in groups]
    return build(BatchOptions, values)


def _group(group: list[str], job_flags: set[str]) -> dict:
    """One output's options from its group of the command line."""
    where = f"{OUTPUT_FLAG} {group[0].partition('=')[2] or (group[1] if len(group) > 1 else '')}".strip()
    for token in group:
        if token.partition("=")[0] in job_flags:
            raise InputError(token.partition("=")[0], f"is an option of the whole batch, given among the options of "
                             f"{where}", f"give it before the first {OUTPUT_FLAG}")
    values = given(_output_parser(f"lora-merge batch {where}").parse_args(group), BatchOptions)
    if "adapters" in values:
        values.setdefault("weights", [])
    return values
