"""A run's claim on its output: refusing an output that is not ours to write, the journal that
records the run before any task writes (so that --resume knows the output whenever the run
stops), what an interrupted run left to resume, and the tidying after a failure or a stop."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from jobs.options import MergeOptions
from jobs.progress import plural
from jobs.runner import Interrupted, stopped_by
from merge_core.errors import InputError, TransientStorageError
from merge_core.io.registry import open_storage, scheme_of
from merge_core.io.storage import Storage
from merge_core.names import CLAIM_NAME, INDEX_NAME, JOURNAL_NAME, MANIFEST_NAME
from merge_core.planning.plan import MergePlan
from merge_core.publish.journal import pause_point, proven, read_journal, write_journal
from merge_core.worker.shard_result import ShardResult

log = logging.getLogger("lora_merge")


# Where Ray Jobs unpacks `--working-dir`: a temporary copy that Ray deletes when it pleases.
RAY_WORKING_DIR_MARK = "/runtime_resources/working_dir_files/"


def _inside_ray_working_dir(output: Storage) -> bool:
    here = os.getcwd()
    if RAY_WORKING_DIR_MARK not in here or scheme_of(output.uri):
        return False
    root = here[:here.index(RAY_WORKING_DIR_MARK) + len(RAY_WORKING_DIR_MARK)]
    return os.path.realpath(output.uri).startswith(root)


def check_output(output: Storage, options: MergeOptions) -> bool:
    """Refuse an output that is not this run's to write; True when it holds a finished model
    (without --overwrite), which only the same merge may find there (see already_complete)."""
    inputs = [open_storage(uri, options.storage).uri.rstrip("/") for uri in (options.checkpoint, *options.adapters)]
    if output.uri.rstrip("/") in inputs:
        raise InputError(output.uri, "the output is one of the inputs", "choose another --output")
    if _inside_ray_working_dir(output):
        raise InputError(output.uri, "lies in the temporary working directory of this Ray job, which Ray deletes",
                         "give --output as an absolute path outside it (on storage every node sees) or an s3:// URI")
    if options.overwrite and options.resume:
        raise InputError("--resume", "cannot be combined with --overwrite", "pass one of them")
    names = [n for n in output.list_names() if n != CLAIM_NAME]  # the claim is checked apart (jobs.lease)
    if INDEX_NAME in names and not options.overwrite:
        return True
    if names and not (options.overwrite or options.resume):
        raise InputError(output.uri, f"the output holds an unfinished merge ({plural(len(names), 'file')})",
                         "pass --resume to finish it, --overwrite to start over, or choose an empty --output")
    if names and options.resume and JOURNAL_NAME not in names:
        # Every run records itself before it writes anything: these files are not a lora-merge run's.
        raise InputError(output.uri, f"nothing to resume: the output holds {plural(len(names), 'file')} but no journal of a "
                         "lora-merge run", "pass --overwrite to replace them, or choose an empty --output")
    return False


def already_complete(output: Storage, options: MergeOptions, key: str) -> bool:
    """Whether the finished model in `output` is this very merge (its manifest records the same
    fingerprint: inputs, what is fused with which scale, settings); refuses it otherwise. A journal
    and a claim left beside it (its driver died between the index and their removal) are removed."""
    manifest = read_manifest(output)
    if manifest is None or manifest.get("fingerprint") != key:
        what = ("the output already holds a finished model of other inputs or settings" if manifest and
                manifest.get("fingerprint") else "the output already holds a model")
        raise InputError(output.describe(INDEX_NAME), what, "pass --overwrite to replace it, or choose another "
                         "--output")
    for stale in (JOURNAL_NAME, CLAIM_NAME):  # no live job holds it (jobs.lease.Lease.refuse_live)
        if output.exists(stale):
            log.info("removing %s: the run it belonged to is over and its model complete", output.describe(stale))
            output.delete(stale)
    return True


def read_manifest(output: Storage) -> dict | None:
    try:
        return json.loads(output.read_bytes(MANIFEST_NAME)) if output.exists(MANIFEST_NAME) else None
    except ValueError:
        return None


def clear_output(output: Storage, journal_key: str) -> None:
    """--overwrite replaces the old output whole: stale shards of another layout would otherwise
    sit beside the new ones, and a loader may pick a stale model.safetensors over the index.
    The index goes first, so the old output stops being a model before anything else changes;
    then this merge's journal, marked `clearing`, so that a --resume finishes an interrupted clear."""
    output.delete(INDEX_NAME)
    write_journal(output, journal_key, [], clearing=True)
    pause_point("clearing")
    for name in output.list_names():
        if name not in (JOURNAL_NAME, CLAIM_NAME):
            output.delete(name)
    output.discard_incomplete()


@dataclass
class Run:
    """This run's record in the output (the journal): what it vouches for, and what an
    interruption reports."""
    output: Storage
    key: str = ""  # the merge's fingerprint
    total: int = 0
    done: list[ShardResult] = field(default_factory=list)
    claimed: bool = False  # whether it may have written to the output yet

    def record(self) -> None:
        write_journal(self.output, self.key, self.done)

    def land(self, result: ShardResult) -> None:
        """A shard published by its task: into the journal, which a store's hiccup only keeps from
        saving a later --resume some work."""
        pause_point("shard-landed")  # tests: the shard is published, the journal does not know it yet
        self.done.append(result)
        try:
            self.record()
        except (TransientStorageError, OSError) as exc:
            log.warning("could not update the resume journal of %s: %s", self.output.uri, exc)


def resumable(output: Storage, options: MergeOptions, plan: MergePlan,
            journal_key: str) -> tuple[list[ShardResult], bool]:
    """With --resume: the shards of the interrupted run that storage still proves complete, and
    whether it had begun clearing the output for --overwrite. An empty output has nothing to
    resume: the merge just starts (the first try of a job spec with `resume: true`)."""
    if not options.resume or not output.exists(JOURNAL_NAME):
        return [], False
    journal = read_journal(output, journal_key)
    if journal.clearing:
        return [], True
    return proven(output, open_storage(options.checkpoint, options.storage), journal.shards, plan), False


def claim(run: Run, options: MergeOptions, reused: list[ShardResult], clearing: bool) -> None:
    """Record this run in the output before any task may write there, so that a --resume knows the
    output whenever this run stops; and remove what must not stay."""
    run.claimed = True
    if options.overwrite or clearing:
        clear_output(run.output, run.key)
    elif options.resume:
        run.output.discard_incomplete()  # temp files and uploads of the interrupted run's unfinished shards
    run.done = list(reused)
    run.record()
    pause_point("journal-written")


def tidy(run: Run, record: bool = True) -> None:
    """After a failure or a stop, its tasks cancelled: no upload left open (a killed worker cannot
    abort its own), the journal current. Never hides the failure that brought us here."""
    pause_point("tidying")  # tests: a second Ctrl-C arrives while the first is being handled
    try:
        run.output.discard_incomplete()
        if record:
            run.record()
    except Exception as exc:  # the store may be what failed; the next --resume tidies instead
        log.warning("could not tidy %s after the failure: %s", run.output.uri, exc)


def interrupted(run: Run, options: MergeOptions) -> Interrupted:
    """What a stopped run says: how far it got, and how to finish."""
    name = stopped_by() or "SIGINT"  # a KeyboardInterrupt not from our handler is a Ctrl-C
    where = run.output.uri
    how = "with --resume in place of --overwrite" if options.overwrite else "with --resume"
    if not run.claimed:
        return Interrupted(name, f"interrupted by {name} before the merge started; nothing was written ({where})")
    try:
        published = run.output.exists(INDEX_NAME)
    except Exception:  # the store may be what failed: say how to finish, which is right either way
        published = False
    if published:  # the final task had written the index before it was cancelled
        return Interrupted(name, f"interrupted by {name} as the model was published; it is complete ({where})")
    return Interrupted(name, f"interrupted by {name}: {len(run.done)} of {run.total} shards are done; run the same "
                       f"command {how} to finish ({where})")
