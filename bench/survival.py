"""How much of an adapter's update survives requantization, per quantized format: the README's survival table.

    .venv/bin/python -m bench.survival                      # every format, about a minute on 2 cores
    .venv/bin/python -m bench.survival "ModelOpt NVFP4" ... # some of them

Each format's test model (the tests' tiny Llama, hidden 128, every decoder linear quantized; tests/ct_models.py,
tests/modelopt_models.py, tests/quantized_models.py) gets a LoRA r=4 on every linear, made on its exact float32
twin, with lora_B of std 0.002, 0.02 and 0.2 (‖ΔW‖/‖W‖ about 2 %, 20 % and 200 %), merged in process with
--scales keep and fresh. A row: per size the median of merge_report.parquet's adapter_kept over the quantized
weights the adapter touched, the worst in brackets, keep / fresh (the median ‖ΔW‖/‖W‖ goes to stderr).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import warnings

ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
B_STDS = (0.002, 0.02, 0.2)


def _fbgemm(path: str):
    from tests.ct_models import llama
    from tests.modelopt_models import decoder_linears, save_fbgemm
    model = llama()
    return save_fbgemm(path, model, decoder_linears(model), ["lm_head"])


def _builders() -> dict:
    from tests.ct_models import save_preset
    from tests.modelopt_models import save_llama
    from tests.quantized_models import save_fp8_llama
    presets = {"FP8 per tensor (FP8)": "FP8", "FP8 per channel (FP8_DYNAMIC)": "FP8_DYNAMIC",
               "FP8 128×128 blocks (FP8_BLOCK)": "FP8_BLOCK", "int8 per channel (W8A8)": "W8A8",
               "int4 groups of 128 (W4A16)": "W4A16", "int4 asymmetric (W4A16_ASYM)": "W4A16_ASYM",
               "NVFP4 (NVFP4A16)": "NVFP4A16", "MXFP4 (MXFP4A16)": "MXFP4A16", "MXFP8 (MXFP8A16)": "MXFP8A16"}
    algos = {"ModelOpt NVFP4": "NVFP4", "ModelOpt FP8 per tensor (FP8)": "FP8",
             "ModelOpt FP8 per channel (FP8_PER_CHANNEL_PER_TOKEN)": "FP8_PER_CHANNEL_PER_TOKEN",
             "ModelOpt FP8 128×128 blocks (FP8_PB_WO)": "FP8_PB_WO", "ModelOpt MXFP8": "MXFP8"}
    return ({"FP8 block-scaled, DeepSeek layout (`fp8`)": save_fp8_llama}
            | {label: lambda p, preset=preset: save_preset(p, preset, fused=True) for label, preset in presets.items()}
            | {label: lambda p, algo=algo: save_llama(p, algo) for label, algo in algos.items()}
            | {"fbgemm FP8 per row (`fbgemm_fp8`)": _fbgemm})


def _adapter(checkpoint, root: str, b_std: float) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tests.quantized_merges import exact_base
    from tests.variant_reference import randomize_adapter
    path = os.path.join(root, f"adapter-{b_std}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(exact_base(checkpoint, path + "-twin"), dtype=torch.float32)
        torch.manual_seed(1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEARS))
        randomize_adapter(peft_model, 1, b_std)
        peft_model.save_pretrained(path)
    return path


def _kept(base: str, adapter: str, out: str, scales: str) -> tuple[str, float]:
    import pyarrow.parquet as pq

    from tests.local_merge import merge_without_ray
    merge_without_ray(base, [adapter], out, scales=scales)
    rows = [r for r in pq.read_table(os.path.join(out, "merge_report.parquet")).to_pylist()
            if r["adapter_kept"] is not None]
    kept = [r["adapter_kept"] for r in rows]
    return f"{statistics.median(kept):.2f} ({min(kept):.2f})", statistics.median(r["relative_change"] for r in rows)


def row(label: str, build, root: str) -> str:
    checkpoint = build(os.path.join(root, "base"))
    cells, changes = [], []
    for b_std in B_STDS:
        adapter = _adapter(checkpoint, root, b_std)
        (keep, change), (fresh, _) = (_kept(checkpoint.path, adapter, os.path.join(root, f"{b_std}-{s}"), s)
                                      for s in ("keep", "fresh"))
        cells.append(f"{keep} / {fresh}".replace("-0.", "−0."))
        changes.append(f"{change:.3f}")
    print(f"{label}: median ‖ΔW‖/‖W‖ {', '.join(changes)}", file=sys.stderr)
    return f"| {label} | " + " | ".join(cells) + " |"


def main(labels: list[str]) -> None:
    builders = _builders()
    unknown = [label for label in labels if label not in builders]
    if unknown:
        sys.exit(f"unknown format {unknown[0]!r}: one of {', '.join(builders)}")
    for label in labels or builders:
        with tempfile.TemporaryDirectory() as root:
            print(row(label, builders[label], root), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
