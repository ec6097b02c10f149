"""Everything one worker needs to merge LoRA adapters into a checkpoint shard, free of any scheduler."""
