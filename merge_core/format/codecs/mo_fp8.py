"""ModelOpt's FP8 with float32 scales: quant_algo FP8 (one scale per tensor, with the activations'
static `X.input_scale`: Nemotron 3 Ultra's shared experts, Qwen3.6 NVFP4's attention, nvidia's -FP8
releases), FP8_PER_CHANNEL_PER_TOKEN (one per row, activations scaled per token at run time) and FP8_PB_WO
(one per 128×128 block, weight only).

Stored: `X.weight` F8_E4M3 (out, in) beside `X.weight_scale` F32: [] per tensor (as the export squeezes
it; [1] also read), [out] or [out, 1] per channel, [out/128, 1, in/128, 1] per block (as the export and
vLLM's ModelOptFp8PbWoLinearMethod hold it; [out/128, in/128] also read), blocks at the edges partial as
FP8QTensor pads them. W = code · scale in float32.

Fresh scales as ModelOpt's exporter computes them (modelopt/torch/export/unified_export_hf.py
`_export_quantized_weight` and quant_utils.to_quantized_weight; qtensor/fp8_tensor.py FP8QTensor.quantize):
scale = amax / 448 over the tensor, the row or the block, in float32; codes = e4m3(W′ / scale), torch's
cast (nearest, ties to even). Two additions: a scale whose amax is 0 is 1 (ModelOpt's own convention
for zero scales; it would divide 0 by 0), and quotients are clamped to ±448 first, which changes nothing
with fresh scales and saturates a merged value past a kept scale instead of casting it to NaN.

Fused siblings keep scales of their own: ModelOpt's export does not unify per-tensor FP8 amax across the
layers that take one input, and vLLM requantizes them to the largest when it fuses them.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs.ct_math import E4M3_MAX
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.mo_codec import SCALAR_SHAPES, MoCodec
from merge_core.format.quantization import QuantArgs, QuantizedWeight

PB_BLOCK = (128, 128)  # FP8_PB_WO's blocks, as vLLM's loader fixes them
TENSOR = QuantArgs(8, "float", "tensor")
CHANNEL = QuantArgs(8, "float", "channel")
BLOCK = QuantArgs(8, "float", "block", block=PB_BLOCK)


class MoFp8(MoCodec):
    name = "modelopt_fp8"
    algos = {"FP8": TENSOR, "FP8_PER_CHANNEL_PER_TOKEN": CHANNEL, "FP8_PB_WO": BLOCK}

    def scale_shapes(self, args: QuantArgs, rows: int, columns: int) -> tuple[tuple[int, ...], ...]:
        if args.strategy == "tensor":
            return SCALAR_SHAPES
        if args.strategy == "channel":
            return (rows,), (rows, 1)
        blocks = -(-rows // args.block[0]), -(-columns // args.block[1])
        return (blocks[0], 1, blocks[1], 1), blocks

    def fresh_scales(self, weight: QuantizedWeight, merged: torch.Tensor, given: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        low, high = self._grid(weight).bounds(merged)
        return {"scale": self.write_scale(weight, amax_scale(torch.maximum(low.abs(), high.abs())))}


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448 in float32, 1 where amax is 0."""
    return torch.where(amax > 0, amax.float() / E4M3_MAX, torch.ones_like(amax, dtype=torch.float32))


CODEC = MoFp8()
