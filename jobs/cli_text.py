"""The command line's words: each command's summary, examples and exit codes, as its --help shows
them (and the README's usage repeats)."""

from __future__ import annotations

SUMMARIES = {
    "merge": "fuse adapters into a base checkpoint and publish the result",
    "verify": "re-check a merged model against its base and adapters, byte for byte",
    "plan": "show what a merge would read, fuse and write; reads headers only, writes nothing",
    "report": "show what a merge changed: a summary, and a heatmap as PNG or HTML",
    "unmerge": "take adapters back out of a merged model, as PEFT's unmerge_adapter() does",
}

_WRITES = """exit codes:
  0    done (the index, written last, says the output is complete)
  2    bad input: one line naming the file, tensor or option and the fix; nothing written
  3    runtime failure after retries, or stopped by SIGTERM: no index written; the same command
       with --resume finishes it
  4    validation failed: no index written; one line per problem follows the error
  130  stopped by Ctrl-C: no index written; --resume finishes it"""

EXIT_CODES = {
    "merge": _WRITES,
    "unmerge": _WRITES,
    "verify": """exit codes:
  0    the merged model is exactly what its base and adapters make
  2    bad input: one line naming the file, tensor or option and the fix
  3    runtime failure after retries (the model was not fully checked)
  4    it differs: one line per problem (shard hash, tensor, element count and ulps)
  130  stopped by Ctrl-C""",
    "plan": """exit codes:
  0    the plan is printed
  2    bad input: one line naming the file, tensor or option and the fix""",
    "report": """exit codes:
  0    the summary is printed (and the pictures written)
  2    bad input: not the output of a finished lora-merge run, or a picture that cannot be drawn or written""",
}

OVERVIEW = """exit codes: 0 done; 2 bad input (one line, nothing written); 3 runtime failure (--resume
finishes it); 4 validation failed; 130 stopped by Ctrl-C. See each command's --help."""

EXAMPLES = {
    "merge": """examples:
  lora-merge merge --base ./Llama-3.1-8B --adapter ./my-lora --output ./merged
  lora-merge merge --base s3://models/llama --adapter s3://loras/a --output s3://models/llama-a
  lora-merge merge --base ./base --adapter ./a --adapter ./b --weight 0.7 --weight 0.3 --output ./merged
  lora-merge merge --config job.yaml --ray-address auto   # relative paths in job.yaml: from its folder""",
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
