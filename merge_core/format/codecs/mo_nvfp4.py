"""ModelOpt's NVFP4 (quant_algo NVFP4, and W4A16_NVFP4 without activation scales): nvidia/DeepSeek-R1-FP4,
-0528, -v2, GLM and Kimi -NVFP4, Nemotron 3 Ultra's routed experts, Qwen3.6 NVFP4's experts.

Stored: `X.weight` U8 (out, in/2), two e2m1 codes a byte with the even element in the low nibble, a code
its sign bit (8) and the index of its magnitude among 0, 0.5, 1, 1.5, 2, 3, 4, 6; `X.weight_scale`
F8_E4M3 (out, in/16), one per 16 values of a row; `X.weight_scale_2` F32, a multiplier; `X.input_scale`
F32 (NVFP4's activations), carried through. W = e2m1 · fp32(weight_scale · weight_scale_2), as ModelOpt's
NVFP4QTensor.dequantize and vLLM's kernels compute it (the product of the two scales rounded once).

Fresh scales as ModelOpt's exporter computes them (modelopt/torch/quantization/qtensor/nvfp4_tensor.py,
NVFP4QTensor: get_weights_scaling_factor_2, get_weights_scaling_factor, quantize), in float32:
weight_scale_2 = amax / (6 · 448); each block's scale = amax_block / (6 · weight_scale_2), 0 made 1,
clamped to [2^-9, 448] and cast to e4m3 (_cast_per_block_scale_to_fp8: torch's cast, nearest with ties to
even; the clamp keeps a block far below the weight's amax from a zero scale); codes = e2m1(W′ /
fp32(weight_scale · weight_scale_2)), nearest with ties to even (NVFP4QTensor._cast_fp4's bounds 0.25,
0.75, 1.25, 1.75, 2.5, 3.5, 5 with the ties at 0.75, 1.75 and 3.5 going up: compressed-tensors'
cast_to_fp4, ct_math.round_e2m1, rounds every value the same way, and a negative value rounding to zero
keeps its sign bit as there).

Fused siblings (q/k/v, gate/up, an expert's w1/w3) share one weight_scale_2: the export gives them the
largest amax of theirs (quant_utils.preprocess_linear_fusion); merge_core.worker keeps it shared. An
all-zero weight, whose amax / 2688 ModelOpt would divide by, is given weight_scale_2 = 1.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.format.codecs import ct_packing
from merge_core.format.codecs.ct_math import E2M1_MAX, E4M3_MAX, GPARAM_NUMERATOR
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.mo_codec import MoCodec
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight

NV_GROUP = 16
SMALLEST_E4M3 = 2.0 ** -9  # the smallest positive e4m3 value (a subnormal)
ARGS = QuantArgs(4, "float", "tensor_group", group_size=NV_GROUP, scale_dtype="float8_e4m3fn")


class MoNvfp4(MoCodec):
    name = "modelopt_nvfp4"
    algos = {"NVFP4": ARGS, "W4A16_NVFP4": ARGS}
    codes_dtype = "U8"
    scale_dtype = "F8_E4M3"

    def columns(self, codes: TensorInfo) -> int:
        return 2 * codes.shape[1]

    def scale_shapes(self, args: QuantArgs, rows: int, columns: int) -> tuple[tuple[int, ...], ...]:
        return ((rows, columns // NV_GROUP),)

    def read_codes(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ct_packing.unpack_e2m1(parts["codes"])

    def write_codes(self, weight: QuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
        return ct_packing.pack_e2m1(codes)

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts["scale"].float() * parts["global_scale"].float()

    def fresh_scales(self, weight: QuantizedWeight, merged: torch.Tensor, given: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        out = {}
        scale_2 = given.get("global_scale")
        if scale_2 is None:
            out = self.tensor_level_for(weight, merged.amin(), merged.amax())
            scale_2 = out["global_scale"]
        amax = merged.float().abs().unflatten(1, (-1, NV_GROUP)).amax(dim=-1)
        block = amax / (E2M1_MAX * scale_2.float())
        block = torch.where(block == 0, torch.ones_like(block), block).clamp(SMALLEST_E4M3, E4M3_MAX)
        return out | {"scale": block.to(torch.float8_e4m3fn)}

    def tensor_level_for(self, weight: QuantizedWeight, low: torch.Tensor, high: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        amax = torch.maximum(low.float().abs(), high.float().abs()).amax()
        scale_2 = torch.where(amax > 0, amax / GPARAM_NUMERATOR, torch.ones_like(amax))
        return {"global_scale": scale_2.reshape(weight.part("global_scale").shape)}


CODEC = MoNvfp4()
