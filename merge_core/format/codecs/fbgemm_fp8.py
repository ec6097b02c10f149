"""quant_method "fbgemm_fp8" (meta-llama/Llama-3.1-405B-Instruct-FP8 and the other FBGEMM FP8 releases;
transformers' integrations/fbgemm_fp8.py, vLLM's fbgemm_fp8.py): `X.weight` F8_E4M3 (out, in) beside
`X.weight_scale` F32 (out, 1), one scale per row, W = code · scale in float32; the layers
modules_to_not_convert names (kept as written) are stored plainly. activation_scale_ub bounds the
activations' scales at run time and concerns no stored tensor.

Fresh scales as FBGEMM's quantize_fp8_per_row computes them (fbgemm_gpu/experimental/gen_ai/src/quantize/
quantize.cu, dynamicQuantizeMatrixRowwise, which transformers' FbgemmFp8Quantize calls), in float32: s =
max(amax_row / 448, 1 / (448 · 512)), the scale clamped from below (its inverse from above at 448 · 512, as
FBGEMM's tests write it); codes = e4m3(W′ / s), CUDA's saturating conversion (nearest, ties to even,
clamped to ±448). The layout is ModelOpt's per-channel FP8 (mo_fp8), whose arithmetic it shares.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from merge_core.errors import InputError
from merge_core.format.codecs.checks import module_names, refusal
from merge_core.format.codecs.ct_math import E4M3_MAX
from merge_core.format.codecs.deferred import torch
from merge_core.format.codecs.mo_codec import MARK
from merge_core.format.codecs.mo_fp8 import CHANNEL, MoFp8
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Method, QuantArgs, QuantizedWeight, QuantScheme

MIN_SCALE_DIVISOR = E4M3_MAX * 512.0  # quantize.cu: min_scaling_factor = 1.0f / (FP8_E4M3_MAX::value * 512.f)


class FbgemmFp8(Method, MoFp8):
    name = "fbgemm_fp8"
    quant_method = "fbgemm_fp8"
    algos = {"fbgemm_fp8": CHANNEL}

    def scale_shapes(self, args: QuantArgs, rows: int, columns: int) -> tuple[tuple[int, ...], ...]:
        return ((rows, 1),)

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        bound = qc.get("activation_scale_ub", 1200.0)
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or bound <= 0:
            raise InputError(f"{subject}.activation_scale_ub", f"{bound!r} is not a positive number",
                             "fix config.json (transformers writes 1200.0)")
        return QuantScheme(self.quant_method, not_converted=module_names(qc, ("modules_to_not_convert",), subject))

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        for name, info in sorted(infos.items()):
            if info.dtype == "F8_E4M3" and name + "_scale" not in infos:
                raise refusal(where, name, f"is F8_E4M3 but has no {name}_scale beside it")
        for name in sorted(infos):
            if name.endswith(MARK):
                yield self.layout(name[: -len(MARK)], infos, CHANNEL, where)

    def describe(self, scheme: QuantScheme) -> str:
        return "fbgemm_fp8 (e4m3, per row)"

    def fresh_scales(self, weight: QuantizedWeight, merged: torch.Tensor, given: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        amax = merged.float().abs().amax(dim=1, keepdim=True)
        floor = torch.tensor(1.0, device=amax.device) / MIN_SCALE_DIVISOR
        return {"scale": torch.maximum(amax / E4M3_MAX, floor)}


CODEC = FbgemmFp8()
