"""What the compressed-tensors formats share: a module `X` stores its weight as `X.weight` or
`X.weight_packed` (the codes), `X.weight_scale`, and as its config group's weights ask, `X.weight_zero_point`
(asymmetric), `X.weight_global_scale` (NVFP4), `X.weight_shape` (packed), `X.weight_g_idx` (activation
ordering); beside them its activations' settings (`X.input_scale`, `X.input_zero_point`,
`X.input_global_scale`), which a merge carries through untouched. Each format (a file of its own)
says how codes and scales are stored; the arithmetic (merge_core.format.codecs.ct_math) is one.

The logical weight is `X.weight`, (out, in), in the dtype compressed-tensors decompresses it to.
"""

from __future__ import annotations

from typing import Mapping

from merge_core.errors import InputError
from merge_core.format.codecs import ct_math
from merge_core.format.codecs.checks import CORRUPT_FIX, refusal
from merge_core.format.codecs.deferred import tensors, torch
from merge_core.format.codecs.floats import as_float32
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Codec, QuantArgs, QuantizedWeight

SUFFIXES = {"codes": "", "scale": "_scale", "zero_point": "_zero_point", "global_scale": "_global_scale",
            "shape": "_shape", "g_idx": "_g_idx"}  # after `X.weight`; the codes' own suffix is the format's
ACTIVATION_PARTS = ("input_scale", "input_zero_point", "input_global_scale")
FLOAT_SCALES = ("BF16", "F16", "F32")
STRATEGIES = ("tensor", "channel", "group", "tensor_group", "block")


class CtCodec(Codec):
    """One compressed-tensors format. Subclasses say how its codes and scales are stored."""

    formats: tuple[str, ...]  # config.json's `format` names it serves
    codes_suffix = ""  # `X.weight` + this holds the codes
    scale_roles = ("scale", "zero_point", "global_scale")
    described_by = ("shape", "g_idx")
    passed_through = ACTIVATION_PARTS
    optional_roles: tuple[str, ...] = ()  # parts `wanted` may ask for that a module need not store

    # ---------------------------------------------------------------- layout (torch-free)

    def check_args(self, args: QuantArgs, subject: str) -> None:
        """What the format cannot hold, refused naming the key."""
        raise NotImplementedError

    def logical(self, codes: TensorInfo, args: QuantArgs, parts: Mapping[str, TensorInfo], where: str
                ) -> tuple[tuple[int, int], str]:
        """(rows, columns), and the dtype the weight decompresses to, from the stored codes."""
        raise NotImplementedError

    def scale_dtypes(self, args: QuantArgs) -> tuple[str, ...]:
        return FLOAT_SCALES

    def layout(self, module: str, infos: Mapping[str, TensorInfo], args: QuantArgs, where: str) -> QuantizedWeight:
        """The module's stored parts, each checked against what its args make of the codes' shape."""
        name = module + ".weight"
        found = {role: infos.get(name + (self.codes_suffix if role == "codes" else suffix))
                 for role, suffix in SUFFIXES.items()}
        found.update({role: infos.get(f"{module}.{role}") for role in ACTIVATION_PARTS})
        codes = found["codes"]
        if codes is None:
            raise refusal(where, name + "_scale", f"has no {name + self.codes_suffix} beside it ({self.formats[0]} "
                          f"stores the codes there)")
        if len(codes.shape) != 2:
            raise refusal(where, codes.name, f"is {codes.dtype}{list(codes.shape)}; {self.formats[0]} codes are 2-D")
        (rows, columns), dtype = self.logical(codes, args, found, where)
        grid = ct_math.Grid(args, rows, columns)
        self._check(found["scale"], self.scale_dtypes(args), grid.shape, where, "weight_scale", module)
        for role, wanted in self.wanted(args, rows, columns).items():
            info = found[role]
            if wanted is None:
                if info is not None:
                    raise refusal(where, info.name, f"is stored, but the config group's weights ({_said(args)}) "
                                  "have none", "fix quantization_config, or re-export the checkpoint")
                continue
            if info is None and role in self.optional_roles:
                continue
            self._check(info, *wanted, where, "weight" + SUFFIXES[role], module)
        parts = tuple((role, info) for role, info in found.items() if info is not None)
        return QuantizedWeight(name, self.name, parts, (rows, columns), dtype=dtype, args=args)

    def wanted(self, args: QuantArgs, rows: int, columns: int) -> dict[str, tuple[tuple[str, ...], tuple] | None]:
        """The optional parts: (dtypes, shape) each must have, or None where it must be absent."""
        grid = ct_math.Grid(args, rows, columns)
        return {"zero_point": None if args.symmetric else (("I8",), grid.shape),
                "global_scale": (("F32",), (1,)) if args.strategy == "tensor_group" else None,
                "shape": None, "g_idx": None}

    @staticmethod
    def _check(info: TensorInfo | None, dtypes: tuple[str, ...], shape: tuple, where: str, what: str,
               module: str = "") -> None:
        if info is None:
            raise InputError(f"{where}: module {module}", f"has no {what}, which its config group's weights need",
                             CORRUPT_FIX)
        if info.dtype not in dtypes or tuple(info.shape) != tuple(shape):
            raise refusal(where, info.name, f"is {info.dtype}{list(info.shape)}, but its weight's codes and "
                          f"config group make {'/'.join(dtypes)}{list(shape)}")

    # ---------------------------------------------------------------- how codes and scales are stored

    def read_codes(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 code values, (rows, columns)."""
        return as_float32(parts["codes"])

    def write_codes(self, weight: QuantizedWeight, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(tensors.TORCH_DTYPES[weight.part("codes").dtype])

    def read_scale(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32 scales, scale-shaped: what the codes are multiplied by (NVFP4: s / global scale)."""
        return as_float32(parts["scale"])

    def write_scale(self, weight: QuantizedWeight, scale: torch.Tensor) -> torch.Tensor:
        """calculate_qparams' float32 scales as stored: rounded to the stored dtype."""
        return scale.to(tensors.TORCH_DTYPES[weight.part("scale").dtype])

    def read_zero(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return parts["zero_point"].float() if "zero_point" in parts else None

    def write_zero(self, weight: QuantizedWeight, zero: torch.Tensor) -> torch.Tensor:
        return zero.to(torch.int8)

    # ---------------------------------------------------------------- the codec

    def _grid(self, weight: QuantizedWeight) -> ct_math.Grid:
        return ct_math.Grid(weight.args, *weight.shape)

    def _spread(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        grid, g_idx = self._grid(weight), parts.get("g_idx")
        zero = self.read_zero(weight, parts)
        return grid.spread(self.read_scale(weight, parts), g_idx), None if zero is None else grid.spread(zero, g_idx)

    def decode(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scale, zero = self._spread(weight, parts)
        return ct_math.dequantize(self.read_codes(weight, parts), scale, zero)

    def encode(self, weight: QuantizedWeight, merged: torch.Tensor,
               given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = dict(given)
        if "scale" not in parts:  # fresh: as a min/max observer calibrates the merged weight
            parts.update(self.fresh_scales(weight, merged, given))
        scale, zero = self._spread(weight, parts)
        parts["codes"] = self.write_codes(weight, ct_math.quantize(merged, scale, zero, weight.args))
        return parts

    def fresh_scales(self, weight: QuantizedWeight, merged: torch.Tensor, given: Mapping[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        """calculate_qparams on each scale's min and max (a global scale given is kept, a missing one
        generated from the whole weight first)."""
        args, out = weight.args, {}
        global_scale = None
        if weight.has("global_scale"):
            global_scale = given.get("global_scale")
            if global_scale is None:
                global_scale = ct_math.generate_gparam(merged.amin(), merged.amax())
                out["global_scale"] = global_scale
        low, high = self._grid(weight).bounds(merged, given.get("g_idx"))
        scale, zero = ct_math.calculate_qparams(low, high, args, global_scale)
        out["scale"] = self.write_scale(weight, scale)
        if weight.has("zero_point"):
            out["zero_point"] = self.write_zero(weight, zero)
        return out

    def step(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scale, _ = self._spread(weight, parts)
        return ct_math.spacing(self.read_codes(weight, parts), weight.args) * scale.abs()

    def reach(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = self._spread(weight, parts)
        qmin, qmax = ct_math.code_range(weight.args)
        zero = torch.zeros_like(scale) if zero is None else zero
        return (qmin - zero) * scale, (qmax - zero) * scale

    def tensor_level(self, weight: QuantizedWeight) -> tuple[str, ...]:
        if weight.args.strategy == "tensor_group":
            return ("global_scale",)
        if weight.args.strategy == "tensor":
            return ("scale", "zero_point") if weight.has("zero_point") else ("scale",)
        return ()

    def tensor_level_for(self, weight: QuantizedWeight, low: torch.Tensor, high: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        if weight.args.strategy == "tensor_group":
            return {"global_scale": ct_math.generate_gparam(low, high)}
        scale, zero = ct_math.calculate_qparams(low.reshape(1), high.reshape(1), weight.args)
        out = {"scale": self.write_scale(weight, scale)}
        if weight.has("zero_point"):
            out["zero_point"] = self.write_zero(weight, zero)
        return out


def _said(args: QuantArgs) -> str:
    return f"{'symmetric' if args.symmetric else 'asymmetric'} {args.type}{args.num_bits}, {args.strategy}"


def refuse_args(subject: str, field: str, value: object, what: str) -> InputError:
    """A config group's weights this format cannot hold."""
    return InputError(f"{subject}.weights.{field}", f"{value!r}: {what}",
                      "fix quantization_config, or merge into an unquantized (bf16) base")
