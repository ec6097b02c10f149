"""The ops: one per kind, and the plain LoRA merge is the formula, rounded once."""

from __future__ import annotations

import torch

from merge_core.kinds import FACTS, Kind
from merge_core.numerics.arithmetic import Arithmetic
from merge_core.numerics.fuse import fuse_into
from merge_core.numerics.ops import OPS, Term
from merge_core.numerics.workspace import workspace_for


def test_every_kind_has_one_op_and_one_row_of_facts():
    assert set(OPS) == set(FACTS) == set(Kind)


def test_a_lora_merge_is_w_plus_b_a_s_rounded_once_and_its_unmerge_subtracts_the_rounded_delta():
    torch.manual_seed(0)
    weight = torch.randn(40, 24).to(torch.bfloat16)
    a, b, scale = torch.randn(4, 24), torch.randn(40, 4), 0.75
    merged = weight.clone()
    fuse_into(merged, [Term(Kind.LORA, {"A": a, "B": b}, scale)], workspace_for("cpu"))
    delta = (b @ a) * scale
    assert torch.equal(merged, (weight.float() + delta).to(torch.bfloat16))
    fuse_into(merged, [Term(Kind.LORA, {"A": a, "B": b}, scale)], workspace_for("cpu"), Arithmetic(unmerge=True))
    assert torch.equal(merged, ((weight.float() + delta).to(torch.bfloat16).float()
                                - delta.to(torch.bfloat16).float()).to(torch.bfloat16))
