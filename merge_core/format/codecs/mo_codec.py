"""What NVIDIA ModelOpt's formats share (its unified Hugging Face checkpoint, written by
modelopt/torch/export/unified_export_hf.py `_export_quantized_weight`, loaded by vLLM's
model_executor/layers/quantization/modelopt.py): a module `X` stores its codes as `X.weight`, its scales
as `X.weight_scale`, NVFP4's per-tensor multiplier as `X.weight_scale_2`, and its activations' static
scale as `X.input_scale`, which a merge carries through untouched. Per-tensor values are stored as
ModelOpt's export squeezes them, shape [] (vLLM loads [1] as well).

The arithmetic is compressed-tensors' (merge_core.format.codecs.ct_math: one scale per tensor, row,
group or block spread over the elements, x / scale rounded to e4m3 or e2m1 with ties to even, saturating
at the format's largest value), which ModelOpt's quantizers compute element for element; each format (a
file of its own) says how its scales are stored and computed fresh. Roles: `codes`, `scale`,
`global_scale` (weight_scale_2, a multiplier here), `input_scale`.

The logical weight is `X.weight`, (out, in), bf16 as the models ModelOpt quantizes are.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.codecs.checks import CORRUPT_FIX, refusal
from merge_core.format.codecs.ct_codec import CtCodec
from merge_core.format.codecs.deferred import tensors, torch
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import QuantArgs, QuantizedWeight

SCALAR_SHAPES = ((), (1,))  # ModelOpt squeezes per-tensor values to []; [1] loads the same in vLLM
SUFFIXES = {"codes": ".weight", "scale": ".weight_scale", "global_scale": ".weight_scale_2",
            "input_scale": ".input_scale"}
MARK = SUFFIXES["scale"]  # every ModelOpt weight format stores one


class MoCodec(CtCodec):
    """One ModelOpt format. Subclasses say what it stores and how fresh scales are computed."""

    algos: dict[str, QuantArgs]  # the quant_algo values stored this way, and their scales in compressed-tensors' words
    codes_dtype = "F8_E4M3"
    scale_dtype = "F32"
    scale_roles = ("scale", "global_scale")
    passed_through = ("input_scale",)
    described_by = ()

    # ---------------------------------------------------------------- layout (torch-free)

    def columns(self, codes: TensorInfo) -> int:
        return codes.shape[1]

    def scale_shapes(self, args: QuantArgs, rows: int, columns: int) -> tuple[tuple[int, ...], ...]:
        """The shapes ModelOpt's export (and vLLM's loader) give weight_scale, the export's first."""
        raise NotImplementedError

    def algo(self, args: QuantArgs) -> str:
        return next(algo for algo, its in self.algos.items() if its == args)

    def layout(self, module: str, infos: Mapping[str, TensorInfo], args: QuantArgs, where: str) -> QuantizedWeight:
        """The module's stored parts, each checked against its codes' shape."""
        found = {role: infos.get(module + suffix) for role, suffix in SUFFIXES.items()}
        codes, scale, name, algo = found["codes"], found["scale"], module + ".weight", self.algo(args)
        if codes is None:
            raise refusal(where, scale.name, f"has no {name} beside it (ModelOpt stores the codes there)")
        if codes.dtype != self.codes_dtype or len(codes.shape) != 2:
            raise refusal(where, name, f"is {codes.dtype}{list(codes.shape)}; {algo} codes are 2-D {self.codes_dtype}")
        rows, columns = codes.shape[0], self.columns(codes)
        if args.group_size and columns % args.group_size:
            raise refusal(where, name, f"has {columns} columns, which {algo}'s groups of {args.group_size} do not "
                          "divide")
        shapes = self.scale_shapes(args, rows, columns)
        if scale.dtype != self.scale_dtype or tuple(scale.shape) not in shapes:
            raise refusal(where, scale.name, f"is {scale.dtype}{list(scale.shape)}, but {algo} and {name} "
                          f"{list(codes.shape)} make {self.scale_dtype}{list(shapes[0])}")
        _check_scalar(found, "global_scale", args.strategy == "tensor_group", module, where)
        _check_scalar(found, "input_scale", None, module, where)
        parts = tuple((role, info) for role, info in found.items() if info is not None)
        return QuantizedWeight(name, self.name, parts, (rows, columns), dtype="BF16", args=args)

    # ---------------------------------------------------------------- how scales are stored

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts["scale"].float().reshape(self._grid(weight).shape)

    def write_scale(self, weight: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        info = weight.part("scale")
        return scale.reshape(info.shape).to(tensors.TORCH_DTYPES[info.dtype])

    def tensor_level(self, weight: QuantizedWeight) -> tuple[str, ...]:
        """Only NVFP4's weight_scale_2 is shared: ModelOpt's export unifies the amax of the layers that take
        one input (quant_utils.preprocess_linear_fusion) except for per-tensor FP8, whose siblings vLLM
        requantizes to the largest of their scales."""
        return ("global_scale",) if weight.args.strategy == "tensor_group" else ()


def _check_scalar(found: Mapping[str, TensorInfo | None], role: str, wanted: bool | None, module: str,
                  where: str) -> None:
    """A per-tensor F32 part: required (wanted), refused (not wanted) or optional (None)."""
    info, what = found[role], module + SUFFIXES[role]
    if info is None:
        if wanted:
            raise InputError(f"{where}: module {module}", f"has no {what}, which NVFP4 weights need (the "
                             "per-tensor multiplier of their block scales)", CORRUPT_FIX)
        return
    if wanted is False:
        raise refusal(where, what, "is stored, but the module's quant_algo has no per-tensor weight scale",
                      "fix the quant_algo in hf_quant_config.json or config.json, or re-export the checkpoint")
    if info.dtype != "F32" or tuple(info.shape) not in SCALAR_SHAPES:
        raise refusal(where, what, f"is {info.dtype}{list(info.shape)}; ModelOpt stores it as one F32 value")
