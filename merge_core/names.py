"""The file names lora-merge reads and writes, in one place (a leaf: imports nothing)."""

# A Hugging Face checkpoint
INDEX_NAME = "model.safetensors.index.json"  # written last: its presence means the model is complete
SINGLE_NAME = "model.safetensors"
CONFIG_JSON = "config.json"
# Files that hold weights in some format: never copied verbatim, or the output would ship
# unmerged weights beside the merged ones.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
# A Hugging Face tokenizer's files, as tokenizer.save_pretrained writes them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")

# A PEFT adapter
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"

# What lora-merge writes beside the merged shards
MANIFEST_NAME = "merge_manifest.json"
REPORT_NAME = "merge_report.parquet"
JOURNAL_NAME = ".lora-merge-journal.json"  # an unfinished merge's record, for --resume
CLAIM_NAME = ".lora-merge-claim.json"  # the one job writing an output now, and until when
# A single-file model is written under this name and renamed when validated: loaders take a
# model.safetensors they find even without the index, so it may not appear before it is checked.
UNVALIDATED_SINGLE_NAME = ".model.safetensors.unvalidated"
# Where --allow-pickle puts converted adapters: under the output, so that every worker can read them.
STAGING_DIR = ".lora-merge-staging"
