"""Publish a merged checkpoint: validate the shards, copy the other files, write the index last.

The index is the commit marker: until it exists the output is not a model, whatever else is
there. It is created exclusively, so two jobs racing on one output cannot both publish.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Mapping, Sequence

from merge_core.errors import ValidationError, raise_if_stopped
from merge_core.io.hashing import record_digest
from merge_core.io.registry import open_storage
from merge_core.io.storage import Storage, StorageOptions, copy_object
from merge_core.names import CONFIG_JSON, INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME, REPORT_NAME
from merge_core.planning.plan import MergePlan
from merge_core.publish.journal import pause_point, vouches_for
from merge_core.publish.manifest import build_manifest
from merge_core.publish.publication import Publication
from merge_core.publish.report import build_report
from merge_core.publish.spot_check import spot_check
from merge_core.publish.validate import check_headers, check_index
from merge_core.worker.job import MergeJob
from merge_core.worker.shard_result import ShardResult


def build_index(plan: MergePlan, base_metadata: Mapping[str, object]) -> tuple[dict, int]:
    weight_map = {name: task.name for task in plan.tasks for name, _, _ in task.output_tensors}
    total_size = sum(task.output_bytes for task in plan.tasks)
    metadata = dict(base_metadata) | {"total_size": total_size}
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}, total_size


def validate_merge(plan: MergePlan, results: Sequence[ShardResult], index: Mapping[str, object], base: Storage,
                   adapters: Sequence[Storage], output: Storage) -> None:
    """The final task's checks; raises ValidationError listing every problem found."""
    reported = {r.name: r for r in results}
    problems = [f"{output.describe(t.name)}: no worker reported this shard" for t in plan.tasks
                if t.name not in reported]
    for task in plan.tasks:
        name = task.output_name
        if task.name in reported and output.exists(name) and output.size(name) != reported[task.name].size:
            problems.append(f"{output.describe(name)}: storage holds {output.size(name)} bytes but the "
                            f"worker wrote {reported[task.name].size}")
    header_problems, headers = check_headers(plan, output)
    problems += header_problems + check_index(plan, index, headers)
    problems += spot_check(plan, base, adapters, output, headers)
    if problems:
        raise ValidationError(problems)


def copy_extra_files(plan: MergePlan, base: Storage, output: Storage, names: Sequence[str],
                     options: StorageOptions = StorageOptions()) -> list[dict]:
    """The base's other files (`names`), as they are, except: config.json with the keys the merge
    changes rewritten (a resized vocabulary's vocab_size, an untied head's tie_word_embeddings,
    --dequantize's quantization_config removed), and the tokenizer files of the adapter that resized the vocabulary in place of the base's."""
    sources = {name: open_storage(uri, options) for name, uri in plan.file_sources.items()}
    copied = []
    for name in sorted({n for n in names if n not in plan.files_left_out} | set(sources)):
        source = sources.get(name, base)
        if name == CONFIG_JSON and (plan.config_updates or plan.config_removed):
            config = json.loads(base.read_bytes(name)) | dict(plan.config_updates)
            for key in plan.config_removed:
                config.pop(key, None)
            data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            output.write_bytes(name, data)
            size, sha = len(data), hashlib.sha256(data).hexdigest()
        else:
            size, sha = copy_object(source, output, name)
        copied.append({"name": name, "size": size, "sha256": sha, "source": source.uri})
    return copied


def publish(output: Storage, plan: MergePlan, index: Mapping[str, object], manifest: Mapping[str, object],
            report: bytes) -> None:
    index_bytes = (json.dumps(index, indent=2) + "\n").encode()
    shards = manifest.get("output", {}).get("shards", [])
    if output.exists(INDEX_NAME):  # an earlier attempt of this task got this far before it was lost
        _check_published(output, index_bytes, shards)
    elif not vouches_for(output, shards):
        # Our driver died and a newer run (--resume, --overwrite) has claimed the output: publishing
        # now would abort that run's uploads and put this run's index over its work.
        raise RuntimeError(f"{output.describe(JOURNAL_NAME)}: another run has taken over this output since this "
                           "one started; this run's output was not published")
    else:
        # Uploads abandoned by killed (and retried) workers would otherwise linger, and be billed.
        output.discard_incomplete()
        for task in plan.tasks:  # a single-file model takes its real name only now, validated
            if task.output_name != task.name:
                output.rename(task.output_name, task.name)
        output.write_bytes(MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
        output.write_bytes(REPORT_NAME, report)
        pause_point("manifest-written")
        try:
            output.write_bytes(INDEX_NAME, index_bytes, exclusive=True)
        except FileExistsError:  # S3 may answer a retried PUT that had landed with 412
            _check_published(output, index_bytes, shards)
    pause_point("index-written")
    try:
        output.delete(JOURNAL_NAME)  # the model is complete: nothing is left to resume
    except Exception:  # published is published; a stale journal is only clutter
        pass


def _check_published(output: Storage, index_bytes: bytes, shards: Sequence[Mapping[str, object]]) -> None:
    """The index is already there: fine if it is this merge's (the same index, and a manifest that
    records the same shard bytes); another job's otherwise."""
    try:
        stored = json.loads(output.read_bytes(MANIFEST_NAME))["output"]["shards"]
        same = output.read_bytes(INDEX_NAME) == index_bytes and \
            [(s["name"], record_digest(s)) for s in stored] == [(s["name"], record_digest(s)) for s in shards]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise RuntimeError(f"{output.describe(INDEX_NAME)}: another job published a model here while this one "
                           "ran; this run's output was not published")


def finalize_merge(plan: MergePlan, job: MergeJob, publication: Publication,
                   stop: threading.Event | None = None) -> dict:
    """Validate (with job.read_back), copy the other files, write the manifest, the report and,
    last, the index. Returns the manifest. `stop`: when set before the index is written, nothing is
    published (Stopped)."""
    pause_point("finalizing")
    started = time.perf_counter()
    output, base = open_storage(job.output_uri, job.storage), open_storage(job.base_uri, job.storage)
    index, total_size = build_index(plan, publication.index_metadata)
    if job.read_back:
        adapters = [open_storage(u, job.storage) for u in job.adapter_uris]
        validate_merge(plan, publication.results, index, base, adapters, output)
    raise_if_stopped(stop, output.describe(INDEX_NAME))
    copied = copy_extra_files(plan, base, output, publication.extra_files, job.storage)
    timings = dict(publication.timings) | {"finalize_seconds": time.perf_counter() - started}
    manifest = build_manifest(plan, publication, copied_files=copied, total_size=total_size, timings=timings,
                              digest=job.digest)
    raise_if_stopped(stop, output.describe(INDEX_NAME))
    publish(output, plan, index, manifest, build_report(plan, publication.results))
    return manifest
