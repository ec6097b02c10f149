"""Every option of every command, declared once: its default, its flag, its help, and what a job
spec (--config) may set it to. The CLI's flags, the job-spec keys and the defaults are all made
from these dataclasses' fields; the driver takes the dataclass itself. An option's key (its name in
a job spec and as a keyword of the Python API) is its field's name unless the field says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from merge_core.io.hashing import DEFAULT_DIGEST, DIGESTS
from merge_core.io.storage import DEFAULT_PART_BYTES, StorageOptions
from merge_core.numerics.arithmetic import COMBINE_METHODS, Arithmetic, Combination

BOOL = (bool, "true or false")
EXECUTORS = ("ray", "local")


def option(default, flag: str | None = None, help: str | Mapping[str, str] = "", *, spec: tuple | None = None,
           required: bool = False, factory=None, commands: tuple[str, ...] | None = None, key: str | None = None,
           per_output: bool = False, **argparse_kwargs):
    """A field with its command-line flag (None: job spec only) and its job-spec type and wording
    (None: command line only). `help` may differ by command: {command: text, "": for the others}.
    `commands`: the only commands that show the flag (None: every command with the field). `key`
    where its job-spec key (and the Python API's keyword) is not the field's name. `per_output`:
    an option of one output, which a batch takes for each output (the others are the whole job's).
    argparse_kwargs: action, type, choices, metavar."""
    metadata = {"flag": flag, "help": help, "spec": spec, "required": required, "argparse": argparse_kwargs,
                "commands": commands, "key": key, "per_output": per_output}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, kw_only=True)
class MergeInputs:
    """What every command reads: the base, the adapters, and how they are put together."""
    # the model the adapters are merged into (or, unmerging, taken out of)
    checkpoint: str = option("", "--base", {
        "": "the base checkpoint: a directory or s3://bucket/prefix holding model.safetensors or "
            "model.safetensors.index.json with its shards",
        "verify": "the base the model was merged from (with --unmerge: the merged model the adapters were taken "
                  "out of)",
        "plan": "the base checkpoint to plan a merge into (with --unmerge: the merged model to take them out of)"},
        spec=(str, "a URI"), required=True, metavar="URI", key="base")
    adapters: tuple[str, ...] = option((), "--adapter", {
        "": "a PEFT adapter directory or prefix; repeat to merge several",
        "verify": "an adapter of the merge; repeat for several, in the merge's order",
        "plan": "a PEFT adapter directory or prefix; repeat to plan a merge of several"},
        spec=(list, "a list of URIs or of {uri, weight}"), required=True, action="append", metavar="URI",
        per_output=True)
    weights: tuple[float, ...] = option((), "--weight", {
        "": "weight of the adapter in the same position (default 1)",
        "verify": "weight of the adapter in the same position (default: as the merged model's manifest records, "
                  "else 1)"}, action="append", type=float, metavar="W", per_output=True)
    sequential: bool = option(False, "--sequential", {
        "": "merge several adapters one after another, rounding after each, in the order given: bit-identical to "
            "PEFT's merge_and_unload(adapter_names=[...]) (default: W + Σ wᵢ·ΔWᵢ, rounded once)",
        "verify": "the merge rounded after each adapter (default: as the merged model's manifest records)"},
        spec=BOOL, action="store_true", commands=("merge", "verify", "plan", "batch"),
        per_output=True)  # an unmerge always rounds after each
    combine: str | None = option(None, "--combine", {
        "": "combine the adapters' full deltas per tensor: ties, dare_linear, dare_ties or magnitude_prune (see "
            "README.md, Several adapters)",
        "verify": "the merge combined the deltas with this method (default: as the merged model's manifest "
                  "records)"}, spec=(str, "ties, dare_linear, dare_ties or magnitude_prune"), choices=COMBINE_METHODS,
        per_output=True)
    density: float = option(1.0, "--density", "with --combine: the fraction of each delta kept, 0 < D <= 1 "
                            "(default 1)", spec=((int, float), "a fraction, 0 < density <= 1"), type=float,
                            metavar="D", per_output=True)
    seed: int = option(0, "--seed", "with --combine dare_*: the seed of the random masks (default 0)",
                       spec=(int, "a whole number"), type=int, per_output=True)
    allow_base_mismatch: bool = option(False, "--allow-base-mismatch", "accept adapters whose configs name "
                                       "different base models", spec=BOOL, action="store_true", per_output=True)
    device: str = option("auto", "--device", {
        "": "where to fuse: cuda needs GPUs in the cluster; auto uses them when present",
        "verify": "where to merge again for the comparison: auto uses GPUs when present (the manifest's record of "
                  "where each shard was fused decides the tolerance)",
        "plan": "the device the plan sizes each task's resources for"},
        spec=(str, "auto, cpu or cuda"), choices=("auto", "cpu", "cuda"))
    unmerge: bool = option(False)  # take the adapters out of --base, a merged model (set by unmerge, plan, verify)
    dequantize: bool = option(False, "--dequantize", {
        "": "write a quantized base's weights (FP8, MXFP4, compressed-tensors, ModelOpt, fbgemm FP8) as bf16: no "
            "scales, no quantization_config or hf_quant_config.json (default: each weight keeps the base's format)",
        "verify": "the merge wrote a quantized base's weights as bf16 (merge --dequantize)",
        "plan": "plan a merge that writes a quantized base's weights as bf16 (merge --dequantize)"},
        spec=BOOL, action="store_true", per_output=True)
    scales: str = option("keep", "--scales", {
        "": "how a quantized base's weights an adapter updates are stored again: keep (the base's scales, zero "
            "points and global scales, only the codes re-rounded) or fresh (recomputed from the merged weight as "
            "the format's own quantizer does; fused siblings share one again) (default keep; see README.md, "
            "Quantized bases)",
        "verify": "the merge kept the base's scales or made fresh ones (default: as the merged model's manifest "
                  "records)",
        "plan": "plan a merge that keeps the base's scales or makes fresh ones (default keep)"},
        spec=(str, "fresh or keep"), choices=("fresh", "keep"), per_output=True)
    part_size_mb: int = option(DEFAULT_PART_BYTES // 2**20, "--part-size-mb", "multipart upload part size for "
                               f"s3:// output (default {DEFAULT_PART_BYTES // 2**20}, at least 5)",
                               spec=(int, "a whole number of MiB"), type=int, metavar="MB",
                               commands=("merge", "unmerge", "batch"))

    @property
    def storage(self) -> StorageOptions:
        return StorageOptions(part_size=self.part_size_mb * 2**20)

    @property
    def arithmetic(self) -> Arithmetic:
        """How the adapters are put together, as one value for the plan and every task."""
        combination = Combination(self.combine, self.density, self.seed) if self.combine else None
        return Arithmetic(sequential=self.sequential, combine=combination, unmerge=self.unmerge)


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    executor: str = option("ray", "--executor", "where the shard tasks run: ray (the cluster at --ray-address, or a "
                           "Ray started for this job) or local (threads of this process on this machine's CPUs: no "
                           "Ray to start or stop, for a merge on one machine) (default ray)",
                           spec=(str, "ray or local"), choices=EXECUTORS)
    ray_address: str | None = option(None, "--ray-address", "join this Ray cluster (default: start a local one)",
                                     spec=(str, "a Ray address"), metavar="ADDR")
    report: str | None = option(None, "--report", {"": "also write the run's summary as JSON to FILE",
                                                   "verify": "also write the findings as JSON to FILE"},
                                spec=(str, "a file path"), metavar="FILE")


@dataclass(frozen=True, kw_only=True)
class MergeOptions(RayOptions, MergeInputs):
    output: str = option("", "--output", {"": "where to write the merged checkpoint (a directory or "
                                              "s3://bucket/prefix)",
                                          "unmerge": "where to write the checkpoint with the adapters taken out (a "
                                                     "directory or s3://bucket/prefix)"},
                         spec=(str, "a URI"), required=True, metavar="URI", per_output=True)
    overwrite: bool = option(False, "--overwrite", "replace whatever is at --output", spec=BOOL, action="store_true",
                             per_output=True)
    resume: bool = option(False, "--resume", {"": "finish an interrupted merge into --output, reusing every shard "
                                              "it proves complete",
                                          "unmerge": "finish an interrupted unmerge into --output, reusing every "
                                                     "shard it proves complete"}, spec=BOOL, action="store_true",
                          per_output=True)
    allow_pickle: bool = option(False, "--allow-pickle", "accept adapters stored only as adapter_model.bin, loaded "
                                "with torch.load(weights_only=True) (never plain unpickling)", spec=BOOL,
                                action="store_true", per_output=True)
    allow_nonfinite: bool = option(False, "--allow-nonfinite", "publish even if fusing produced NaN/Inf values the "
                                   "base did not have", spec=BOOL, action="store_true", per_output=True)
    validate: bool = option(True, "--no-validate", "skip the read-back of shards and the checks before the index "
                            "is written", spec=BOOL, action="store_false", per_output=True)
    digest: str = option(DEFAULT_DIGEST, "--digest", "the digest of each shard in the manifest and the journal: "
                         "blake3 (cryptographic, ~2x faster than sha256 per core) or sha256, for a registry that "
                         f"keys on it (default {DEFAULT_DIGEST}; see README.md, Digests)",
                         spec=(str, "blake3 or sha256"), choices=DIGESTS, commands=("merge", "unmerge", "batch"))
    allow_remerge: bool = option(False, "--allow-remerge", "merge an adapter that the base (a lora-merge output) "
                                 "already holds, by its manifest, a second time", spec=BOOL, action="store_true",
                                 per_output=True)
    lease_seconds: float = option(60.0, "--lease-seconds", "how long this run's claim on --output lasts without "
                                  "being renewed (it renews a third of the way): after its driver dies, another "
                                  "run takes the output over with --resume once this much time has passed (at once "
                                  "on the same host) (default 60)", spec=((int, float), "a number of seconds"),
                                  type=float, metavar="S")
    task_cpus: int | None = option(None, "--task-cpus", "CPUs each shard task asks for (default: 1, or an equal "
                                   "share of the cores when the shards are fewer)",
                                   spec=(int, "CPUs each shard task asks Ray for"), type=int, metavar="N")
    report_png: str | None = option(None, "--report-png", "after publishing, draw the report's heatmap to FILE (a "
                                    "path, or an s3:// URI such as the model's own prefix); needs the plot extra",
                                    spec=(str, "a file path or URI"), metavar="FILE", per_output=True)
    task_resources: Mapping[str, float] = option(None, None, spec=(dict, "extra Ray resources per shard task, "
                                                                   "name: amount"), factory=dict)


@dataclass(frozen=True, kw_only=True)
class UnmergeOptions(MergeOptions):
    """Take adapters back out of a merged model: merge's options, the merged model in --base's place."""
    checkpoint: str = option("", "--merged", "the merged model (a directory or s3://bucket/prefix) to take the "
                             "adapters out of", spec=(str, "the merged model's URI"), required=True, metavar="URI",
                             key="base")
    original_base: str | None = option(None, "--base", "the original base, to report how much of it came back bit "
                                       "for bit (default: the base the merged model's manifest records, if it is "
                                       "still there)", spec=(str, "a URI"), metavar="URI", key="original")
    strict: bool = option(False, "--strict", "refuse an adapter the merged model's manifest does not record "
                          "(default: warn)", spec=BOOL, action="store_true")
    adapters: tuple[str, ...] = option((), "--adapter", "a PEFT adapter merged into --merged; repeat to take out "
                                       "several (the last given comes out first)",
                                       spec=(list, "a list of URIs or of {uri, weight}"), required=True,
                                       action="append", metavar="URI")
    weights: tuple[float, ...] = option((), "--weight", "weight the adapter in the same position was merged with "
                                        "(default: as the merged model's manifest records, else 1)",
                                        action="append", type=float, metavar="W")
    unmerge: bool = option(True)
    # merge's options that have no meaning here: no flag, no job-spec key
    combine: str | None = option(None)
    density: float = option(1.0)
    seed: int = option(0)
    dequantize: bool = option(False)
    allow_remerge: bool = option(False)


@dataclass(frozen=True, kw_only=True)
class BatchOptions(MergeOptions):
    """Several outputs from one read of the base: merge's options, of two kinds. The whole job's
    (--base, --device, the cluster, the tasks, --report) once; an output's own (per_output: its
    adapters and weights, how they are put together, --dequantize, --overwrite/--resume, ...)
    after each --output, or in its entry of `outputs` in a job spec; given before the first
    --output (at the top of a job spec), an output's option applies to every output."""
    output: str = option("", "--output", {"batch": "starts an output: where to write it; its own options (--adapter, "
                                          "--weight, --combine, --dequantize, --resume, ...) follow, up to the next "
                                          "--output; repeat for each output"},
                         required=True, metavar="URI", per_output=True, action="append")
    adapters: tuple[str, ...] = option((), "--adapter", {"batch": "a PEFT adapter of the output before it; repeat "
                                                         "to merge several into it"},
                                       spec=(list, "a list of URIs or of {uri, weight}"), action="append",
                                       metavar="URI", per_output=True)
    outputs: tuple[Mapping[str, object], ...] = option(
        (), None, spec=(list, "a list of outputs, each a mapping of its options (output, adapters, combine, ...)"),
        factory=tuple)
    plan: bool = option(False, "--plan", "show what the batch would read, fuse and write, from headers alone "
                        "(the base read once, each output written); writes nothing, starts no Ray",
                        action="store_true")
    json: bool = option(False, "--json", "with --plan: print the plan as JSON", action="store_true")


@dataclass(frozen=True, kw_only=True)
class VerifyOptions(RayOptions, MergeInputs):
    merged: str = option("", "--merged", "the merged model to check", required=True, metavar="URI")
    unmerge: bool = option(False, "--unmerge", "check an unmerge: --base is the merged model, --merged the result",
                           action="store_true")


@dataclass(frozen=True, kw_only=True)
class ReportOptions:
    merged_uri: str = option("", "MERGED_URI", "the merged model (a directory or s3:// prefix) whose "
                             "merge_report.parquet and merge_manifest.json to show", required=True)
    png: str | None = option(None, "--png", "draw the heatmap of ‖ΔW‖/‖W‖ (layers × modules) to FILE (a path or "
                             "an s3:// URI); needs the plot extra", metavar="FILE")
    html: str | None = option(None, "--html", "write the picture and the summary as one self-contained HTML "
                              "file (a path or an s3:// URI)", metavar="FILE")


@dataclass(frozen=True, kw_only=True)
class PlanOptions(MergeInputs):
    json: bool = option(False, "--json", "print the plan as JSON", action="store_true")
    unmerge: bool = option(False, "--unmerge", "plan taking the adapters out of --base, a merged model",
                           action="store_true")


def help_for(meta: Mapping, command: str) -> str:
    text = meta["help"]
    return text.get(command, text.get("", "")) if isinstance(text, Mapping) else text


def add_flags(parser: argparse.ArgumentParser, options: type, command: str, from_config: bool = False,
              per_output: str | None = None) -> None:
    """One flag per field that has one, with that command's wording; required ones in a group of
    their own, and with `per_output` (its title) an output's own options too. Every flag defaults to
    None, so that a value given on the command line can be told from one left out (and merged over
    a job spec, then the defaults). With from_config, required options may come from the --config
    file instead."""
    needed = parser.add_argument_group("required" + (" (here, or in the --config file)" if from_config else ""))
    outputs = parser.add_argument_group(per_output) if per_output else None
    for f in dataclasses.fields(options):
        meta = f.metadata
        if not meta.get("flag") or command not in (meta.get("commands") or (command,)):
            continue
        kwargs = dict(meta["argparse"])
        if kwargs.get("action") in ("store_true", "store_false"):
            kwargs["default"] = None
        if not meta["flag"].startswith("-"):  # a positional argument, named by its metavar
            parser.add_argument(key_of(f), metavar=meta["flag"], help=help_for(meta, command), **kwargs)
            continue
        group = outputs if outputs and meta.get("per_output") else needed if meta["required"] else parser
        group.add_argument(meta["flag"], dest=key_of(f), help=help_for(meta, command),
                           required=meta["required"] and not from_config, **kwargs)


def key_of(f: dataclasses.Field) -> str:
    """An option's key: its name in a job spec, on the command line's namespace and in the Python API."""
    return f.metadata.get("key") or f.name


def spec_keys(options: type) -> dict[str, tuple]:
    """The job-spec keys of an options dataclass: key → (type, what the value must be)."""
    return {key_of(f): f.metadata["spec"] for f in dataclasses.fields(options) if f.metadata.get("spec")}


def defaults(options: type) -> dict[str, object]:
    return {key_of(f): f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(options)}


def required(options: type) -> dict[str, str]:
    """key → flag of the options that must be given, on the command line or in a job spec."""
    return {key_of(f): f.metadata["flag"] for f in dataclasses.fields(options) if f.metadata.get("required")}


def build(options: type, values: Mapping[str, object]):
    """The options dataclass from resolved values by key (lists become tuples: the dataclass is frozen)."""
    fields = {key_of(f): f.name for f in dataclasses.fields(options)}
    return options(**{fields[k]: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields})


def given(args: argparse.Namespace, options: type) -> dict[str, object]:
    """The values the command line gave, by key (flags left out are None)."""
    keys = {key_of(f) for f in dataclasses.fields(options)}
    return {k: v for k, v in vars(args).items() if k in keys and v is not None}



def output_keys(options: type = BatchOptions) -> dict[str, tuple]:
    """The job-spec keys of one output (an entry of a batch's `outputs`): key → (type, wording)."""
    return {key_of(f): f.metadata["spec"] or (str, "a URI") for f in dataclasses.fields(options)
            if f.metadata.get("per_output") and (f.metadata.get("spec") or f.name == "output")}


# What belongs to one output only: never a default for every output.
OUTPUT_ONLY = ("output", "adapters", "weights", "report_png")


def batch_keys() -> dict[str, tuple]:
    """The job-spec keys at the top of a batch: the whole job's, and the outputs' defaults."""
    return {k: v for k, v in spec_keys(BatchOptions).items() if k not in OUTPUT_ONLY}


def per_output_flags(options: type = BatchOptions) -> set[str]:
    return {f.metadata["flag"] for f in dataclasses.fields(options) if f.metadata.get("per_output")
            and f.metadata.get("flag")}


def outputs_of(batch: BatchOptions) -> tuple[MergeOptions, ...]:
    """Each output's merge options: the job's, its defaults, and its own entry."""
    shared = {key_of(f): getattr(batch, f.name) for f in dataclasses.fields(MergeOptions)
              if key_of(f) not in OUTPUT_ONLY}
    return tuple(build(MergeOptions, shared | dict(entry)) for entry in batch.outputs)
