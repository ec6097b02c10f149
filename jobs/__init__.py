"""The Ray side of lora-merge: CLI, driver, and the tasks that call into merge_core."""
