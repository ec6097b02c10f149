"""Quantized base checkpoints: the words every format is described in, and the protocols each one
implements (a file in merge_core/format/codecs/ and a line in its registry, CODECS).

A quantized format keeps a logical weight as several stored tensors (its codes, its scales, ...):
which ones, read from config.json and the headers, how they decode to the float32 weight the model
holds, and how a merged weight is encoded again. Which modules are quantized is decided by what is
stored, not by modules_to_not_convert/ignore: a weight stored plainly merges like any bf16 tensor, and
those lists (kept in the scheme for the record) follow each loader's own matching rules, which we need
not copy.

Two protocols: a `Method` reads one quant_method's config.json and finds its weights among the stored
tensors; a `Codec` computes one stored layout (decode, encode, step). FP8 block-scaled and GPT-OSS's
MXFP4 are both at once; compressed-tensors is one method whose config groups each name a format, each
format a codec of its own.

Torch-free, as are the formats' layouts: the driver plans from headers alone.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.header import TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class QuantArgs:
    """How a weight was quantized, in compressed-tensors' words (its QuantizationArgs, as config.json
    writes them): `strategy` says which elements share a scale (tensor, channel, group, tensor_group,
    block)."""

    num_bits: int
    type: str  # "int" or "float"
    strategy: str
    _: KW_ONLY
    symmetric: bool = True
    group_size: int | None = None
    block: tuple[int, int] | None = None  # block_structure (rows, columns)
    scale_dtype: str | None = None  # as torch names it ("float8_e4m3fn" for NVFP4, "uint8" for MX), when set


@dataclass(frozen=True)
class QuantScheme:
    """config.json's quantization_config, checked. Fields of the other methods keep their defaults."""

    method: str  # its quant_method
    _: KW_ONLY
    block: tuple[int, int] | None = None  # fp8 weight_block_size (rows, columns)
    scale_fmt: str = "float"  # fp8: "float", or "ue8m0" (every scale a power of two)
    group_size: int | None = None  # values per scale: mxfp4's 32
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert / ignored_layers / ignore, as written
    # A method's own parsed settings (compressed-tensors: its config groups), for its `group`.
    groups: tuple = ()
    # Formats the checkpoint declares that lora-merge has no codec for (a quant_method it does not know,
    # or a compressed-tensors format such as mxfp6): their tensors are copied as they are, and an adapter
    # that touches one is refused.
    uncoded: tuple[str, ...] = ()
    # Files beside config.json that also declare the format (ModelOpt's hf_quant_config.json): --dequantize
    # leaves them out, or engines would read the bf16 output as quantized.
    config_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantizedWeight:
    """One logical weight and the stored tensors it is made of."""

    name: str  # `X.weight` (fp8, compressed-tensors) or the bf16 model's `...experts.gate_up_proj` (mxfp4)
    codec: str  # the name of its codec (merge_core.format.codecs.CODECS)
    parts: tuple[tuple[str, TensorInfo], ...]  # role -> stored tensor, in the codec's order: the codes first
    shape: tuple[int, ...]  # as the model holds it in memory once dequantized
    _: KW_ONLY
    dtype: str = "BF16"  # what transformers dequantizes to
    block: tuple[int, int] | None = None  # fp8
    scale_fmt: str = "float"  # fp8
    group_size: int | None = None  # mxfp4
    args: QuantArgs | None = None  # compressed-tensors: its config group's weights

    def part(self, role: str) -> TensorInfo:
        for name, info in self.parts:
            if name == role:
                return info
        raise KeyError(role)

    def has(self, role: str) -> bool:
        return any(name == role for name, _ in self.parts)

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(role for role, _ in self.parts)

    @property
    def stored_names(self) -> tuple[str, ...]:
        return tuple(info.name for _, info in self.parts)

    @property
    def primary(self) -> TensorInfo:
        """The largest part (the codes): the output writes the weight where the base stores it."""
        return self.parts[0][1]


class Method:
    """One quant_method: its config.json and where its weights are among the stored tensors."""

    quant_method: str  # config.json's quant_method
    config_file: str | None = None  # a file beside config.json that declares the format when config.json does not

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        """quantization_config, checked, InputError naming the key otherwise."""
        raise NotImplementedError

    def read_config_file(self, data: object, where: str) -> QuantScheme:
        """`config_file`'s contents (parsed JSON), checked, InputError naming the key otherwise."""
        raise NotImplementedError

    def group(self, scheme: QuantScheme, tensors: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        """Every weight of the format among the checkpoint's tensors (all shards', by name), each checked."""
        raise NotImplementedError

    def describe(self, scheme: QuantScheme) -> str:
        """The format as a user names it, e.g. 'fp8 e4m3, 128×128 blocks'."""
        raise NotImplementedError

    def format_of(self, scheme: QuantScheme, module: str) -> str:
        """The format a module's stored tensors are in, as the refusal of an adapter on one names it."""
        return self.quant_method


class Codec:
    """One stored layout. Its tensor methods take and give torch tensors on any device: `decode` gives
    the exact float32 weight (as transformers or the format's own library dequantizes, before rounding
    to bf16), `encode` the stored parts by role with the stored dtypes and shapes, requantized as the
    format's reference quantizer does."""

    name: str  # the report's `codec`
    scale_roles: tuple[str, ...] = ("scale",)  # the parts --scales keep keeps: scales, zero points, global scales
    described_by: tuple[str, ...] = ()  # parts that describe the weight rather than hold it (decode needs none)
    passed_through: tuple[str, ...] = ()  # parts the weight carries unchanged (its activations' settings)

    def meet(self, weight: QuantizedWeight, target: str, resizes: bool, subject: str) -> None:
        """An adapter's update of `target` (the weight, or one of its stored parts), which may resize it:
        an adapter updates the logical weight in place, never a scale, never at another shape."""
        if target != weight.name:
            raise InputError(subject, f"targets {target}, a stored part of the quantized weight {weight.name}",
                             f"train the adapter on the model's own module ({weight.name})")
        if resizes:
            raise InputError(subject, f"resizes {target}, which the base stores quantized ({self.name})",
                             "merge into an unquantized base checkpoint")

    def check_stored(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor],
                     where: Mapping[str, str]) -> None:
        """Values of the parts the headers do not show, once read (`where`: each part's file)."""

    def decode(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, weight: QuantizedWeight, merged: torch.Tensor,
               given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The parts of a float32 weight. `given`: parts kept as they are (the base's scale_roles with
        --scales keep; a tied tensor-level scale), the rest computed."""
        raise NotImplementedError

    def step(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float32, the weight's shape: how far apart each stored value and the next one the format can
        store are (a correct requantization rounds within half of it)."""
        raise NotImplementedError

    def reach(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """float32, the weight's shape: the lowest and highest value each element can hold with these
        scales (kept scales saturate a merged value beyond them)."""
        raise NotImplementedError

    def rows(self, weight: QuantizedWeight, parts: Mapping[str, torch.Tensor], rows: Sequence[int]
             ) -> tuple[QuantizedWeight, dict[str, torch.Tensor]] | None:
        """These rows alone as a weight of the same format whose values, steps and reach are those rows'
        (for a check that samples rows), or None where the parts do not come apart by rows."""
        return None

    # Fused siblings (q/k/v, gate/up, an expert's w1/w3) may share one tensor-level scale.

    def tensor_level(self, weight: QuantizedWeight) -> tuple[str, ...]:
        """The parts holding one value for the whole tensor, which siblings may share (none by default)."""
        return ()

    def tensor_level_for(self, weight: QuantizedWeight, low: torch.Tensor, high: torch.Tensor
                         ) -> dict[str, torch.Tensor]:
        """Those parts, fresh, for a tensor (or fused siblings seen as one) whose values span [low, high]."""
        raise NotImplementedError
