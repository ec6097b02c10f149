"""Where LoRA on a parameter (target_parameters: PEFT's ParamWrapper, MoE experts) lands in a checkpoint.

PEFT adapts the parameter as the model holds it in memory: a 2-D weight, or 3-D experts
(E, out, in), or (E, in, out) in models that transpose them (GPT-OSS). Checkpoints store the
experts either so, or one tensor per expert and projection, which transformers fuses on load
(its conversion mapping): Mixtral's block_sparse_moe.experts.{e}.w1/w3 (gate_up_proj's rows, in
that order) and w2, or experts.{e}.gate_proj/up_proj/down_proj in Qwen-MoE, DeepSeek, OLMoE and
most other families. Each expert's tensor is then updated from its own slices of lora_A and lora_B.
"""

from __future__ import annotations

import dataclasses

from merge_core.errors import InputError
from merge_core.format.header import TensorInfo
from merge_core.inputs.adapter import ModuleUpdate
from merge_core.inputs.checkpoint import BaseCheckpoint
from merge_core.kinds import ExpertShare

# Expert tensors stored one per expert: transformers fuses <experts>.{e}.<part>.weight into the
# 3-D parameter PEFT adapts, the parts' rows one after another ((E, out, in), out = the parts').
# Mixtral-style checkpoints name the module block_sparse_moe where the model says mlp.
EXPERT_PARTS = {"gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")), "down_proj": (("down_proj",), ("w2",))}
EXPERT_MODULE_NAMES = ((".mlp.", ".mlp."), (".mlp.", ".block_sparse_moe."))
# Models whose expert parameters are (E, in, out) (is_transposed in transformers), for when the
# shapes cannot tell (in = out).
TRANSPOSED_EXPERT_MODELS = ("gpt_oss", "aria", "aria_text", "openai_privacy_filter")


def row_slice(info: TensorInfo, first: int, end: int) -> TensorInfo:
    """Rows [first, end) of an adapter tensor, as a tensor of their own."""
    row_bytes = info.nbytes // info.shape[0]
    return TensorInfo(name=info.name, dtype=info.dtype, shape=(end - first, *info.shape[1:]),
                      start=info.start + first * row_bytes, end=info.start + end * row_bytes)


def expert_targets(base: BaseCheckpoint, update: ModuleUpdate, where: str) -> list[ModuleUpdate]:
    """Where LoRA on a parameter (target_parameters) lands in the checkpoint: the parameter itself
    (2-D, or 3-D experts (E, out, in), or (E, in, out) where the model transposes them), or each
    expert's share of it where the checkpoint stores the experts one by one. `where`: the adapter
    file, for messages."""
    a, b = update.factor("A"), update.factor("B")
    experts, rank = update.experts.count, update.rank
    if base.has(update.target):
        shape = base.info(update.target).shape
        if len(shape) != 3:
            return [update]
        fits = [t for t, dims in ((True, (a.shape[1], b.shape[0])), (False, (b.shape[0], a.shape[1])))
                if tuple(shape[1:]) == dims]
        transposed = fits[0] if len(fits) == 1 else base.config.get("model_type") in TRANSPOSED_EXPERT_MODELS
        return [dataclasses.replace(update, transpose=transposed)]
    module, _, param = update.target.rpartition(".")
    for model_name, stored_name in EXPERT_MODULE_NAMES:
        stored = f".{module}".replace(model_name, stored_name)[1:]
        for parts in EXPERT_PARTS.get(param, ()):
            names = [[f"{stored}.{e}.{part}.weight" for part in parts] for e in range(experts)]
            if not all(base.has(n) for row in names for n in row) or b.shape[0] % len(parts):
                continue
            stored_count = experts
            while base.has(f"{stored}.{stored_count}.{parts[0]}.weight"):
                stored_count += 1
            if stored_count != experts:
                raise InputError(f"{where}: tensor {a.name}", f"holds LoRA for {experts} experts of "
                                 f"{update.target}, but the base stores {stored_count}",
                                 "check that the adapter was trained on this base model")
            rows = b.shape[0] // len(parts)
            return [dataclasses.replace(update, target=name, experts=ExpertShare(experts, e), factors=(
                        row_slice(a, e * rank, (e + 1) * rank), row_slice(b, j * rows, (j + 1) * rows)))
                    for e, row in enumerate(names) for j, name in enumerate(row)]
    return [update]
