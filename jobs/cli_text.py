"""The command line's words: each command's summary, examples and exit codes, as its --help shows
them (and the README's usage repeats)."""

from __future__ import annotations

SUMMARIES = {
    "merge": "fuse adapters into a base checkpoint and publish the result",
    "verify": "re-check a merged model against its base and adapters, byte for byte",
    "plan": "show what a merge would read, fuse and write; reads headers only, writes nothing",
    "report": "show what a merge changed: a summary, and a heatmap as PNG or HTML",
    "unmerge": "take adapters back out of a merged model, as PEFT's unmerge_adapter() does",
    "batch": "merge several adapters into several models from one read of the base, each output exactly what "
             "its own merge would write",
}

_WRITES = """exit codes:
  0    done (the index, written last, says the output is complete)
  2    bad input: one line naming the file, tensor or option and the fix; nothing written
  3    runtime failure after retries, or stopped by SIGTERM: no index written; the same command
       with --resume finishes it
  4    validation failed: no index written; one line per problem follows the error
  130  stopped by Ctrl-C: no index written; --resume finishes it"""

EXIT_CODES = {
    "batch": """exit codes:
  0    every output is done (published, or found complete already)
  2    bad input for the batch (an output listed twice, two outputs at one URI, an output inside the
       base, ...): one line, nothing written. Or some output's bad input (a bad adapter, an output
       another job holds): the other outputs are published, one line per failed output follows
  3    an output failed after retries, or the batch was stopped by SIGTERM: the others are
       published; the same command with --resume finishes what is left of each
  4    an output failed validation: the others are published
  130  stopped by Ctrl-C: no output left half-published; --resume finishes each
  When outputs fail in different ways, the highest of their codes.""",
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
finishes it); 4 validation failed; 130 stopped by Ctrl-C. A batch some of whose outputs failed
exits with the highest code among them, the others published. See each command's --help."""

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
    "batch": """examples:
  lora-merge batch --base ./llama --output ./llama-a --adapter ./a --output ./llama-b --adapter ./b
  lora-merge batch --base s3://models/llama --resume \\
      --output s3://models/llama-a --adapter s3://loras/a \\
      --output s3://models/llama-bc --adapter s3://loras/b --weight 0.7 --adapter s3://loras/c --weight 0.3 \\
      --output s3://models/llama-d --adapter s3://loras/d --dequantize
  lora-merge batch --config nightly.yaml          # outputs: [{output: ..., adapters: [...]}, ...]
  lora-merge batch --config nightly.yaml --plan   # the base read once, each output written

  Options before the first --output are the whole job's, and an output's option given there
  (--resume, --dequantize, ...) applies to every output; each output's own follow its --output.""",
    "report": """examples:
  lora-merge report ./merged
  lora-merge report s3://models/llama-a --png report.png --html s3://models/llama-a/merge_report.html""",
}
