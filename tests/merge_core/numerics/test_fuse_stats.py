"""What the fuse measures for the report: each adapter's own ‖ΔW‖ when several update one tensor."""

from __future__ import annotations

import torch

from merge_core.kinds import Kind
from merge_core.numerics.arithmetic import Arithmetic
from merge_core.numerics.fuse import fuse_into
from merge_core.numerics.ops import Term
from merge_core.numerics.workspace import workspace_for


def test_each_adapters_norm_is_measured_apart_when_several_update_a_tensor():
    torch.manual_seed(0)
    weight = torch.randn(16, 12).to(torch.bfloat16)
    a1, b1, a2, b2 = torch.randn(2, 12), torch.randn(16, 2), torch.randn(3, 12), torch.randn(16, 3) * 10
    vector = 1 + 0.3 * torch.randn(16, 1)  # PEFT stores an output-side IA3 vector as (out, 1)
    terms = [Term(Kind.LORA, {"A": a1, "B": b1}, 0.5), Term(Kind.IA3, {"l": vector}, side="out"),
             Term(Kind.LORA, {"A": a2, "B": b2}, 2.0)]
    merged = weight.clone()
    stats = fuse_into(merged, terms, workspace_for("cpu"), Arithmetic(sequential=True))
    first = weight.float() + 0.5 * (b1 @ a1)
    scaled = first.to(torch.bfloat16).float() * vector
    assert len(stats.adapter_norms) == 3
    torch.testing.assert_close(stats.adapter_norms[0], float((0.5 * (b1 @ a1)).norm()), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.adapter_norms[1], float((scaled - first.to(torch.bfloat16).float()).norm()),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(stats.adapter_norms[2], float((2.0 * (b2 @ a2)).norm()), rtol=1e-5, atol=0)
    assert fuse_into(weight.clone(), terms[:1], workspace_for("cpu")).adapter_norms == (), "one update: no split"
