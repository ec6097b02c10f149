"""quant_method "compressed-tensors" (llm-compressor's checkpoints, vLLM's and SGLang's loaders): which
config group each stored module belongs to, and so which format (codec) holds its weight.

A module is quantized when it stores `X.weight_scale` (every weight format does) or `X.weight_packed`.
Its group is the one whose targets match it as compressed-tensors' apply_quantization_config matches
them: a group later in config_groups takes a target string over an earlier one; an exact module name
beats a "re:" pattern (re.match), which beats a class name such as Linear (which, from names alone,
matches every quantized module). The ignore list is kept as written: what is stored decides.

A format without a codec here (mxfp6-pack-quantized, a future one) leaves its modules as they are: they
are copied byte for byte, and an adapter that touches one is refused.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping, Sequence

from merge_core.errors import InputError
from merge_core.format.codecs import ct_mxfp4, ct_mxfp8, ct_naive, ct_nvfp4, ct_packed
from merge_core.format.codecs.checks import refusal
from merge_core.format.codecs.ct_codec import CtCodec
from merge_core.format.codecs.ct_config import ConfigGroup, read_groups
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Method, QuantizedWeight, QuantScheme

FORMAT_CODECS: tuple[CtCodec, ...] = (ct_naive.CODEC, ct_packed.CODEC, ct_nvfp4.CODEC, ct_mxfp4.CODEC, ct_mxfp8.CODEC)
_BY_FORMAT = {fmt: codec for codec in FORMAT_CODECS for fmt in codec.formats}
MARKS = (".weight_scale", ".weight_packed")  # a quantized module stores one of these
PARTS = (".weight_zero_point", ".weight_global_scale", ".weight_shape", ".weight_g_idx")


class CompressedTensors(Method):
    quant_method = "compressed-tensors"

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        groups, ignore = read_groups(qc, subject)
        for group in groups:
            codec = _BY_FORMAT.get(group.format)
            if codec is not None:
                codec.check_args(group.args, f"{subject}.config_groups.{group.key}")
        uncoded = tuple(sorted({g.format for g in groups if g.format not in _BY_FORMAT}))
        return QuantScheme(self.quant_method, groups=groups, not_converted=ignore, uncoded=uncoded)

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        modules = sorted({name[: -len(mark)] for name in infos for mark in MARKS if name.endswith(mark)})
        marked = set(modules)
        for name in infos:
            stem = next((name[: -len(s)] for s in PARTS if name.endswith(s)), None)
            if stem is not None and stem not in marked:
                raise refusal(where, name, f"has no {stem}.weight_scale beside it (every compressed-tensors weight "
                              "format stores one)")
        used: set[str] = set()
        for module in modules:
            group = group_of(scheme.groups, module)
            if group is None:
                raise refusal(where, f"{module}.weight_scale", "is a quantized weight's scale, but no config group "
                              f"targets {module} ({_targets(scheme.groups)})",
                              "fix quantization_config's config_groups, or re-export the checkpoint")
            used.add(group.key)
            codec = _BY_FORMAT.get(group.format)
            if codec is not None:
                yield codec.layout(module, infos, group.args, where)
        idle = [g for g in scheme.groups if g.key not in used]
        if idle:
            raise InputError(f"{where}: config.json: quantization_config.config_groups.{idle[0].key}", "names no "
                             f"stored tensor: no quantized module matches its targets {list(idle[0].targets)}",
                             "remove the group, or fix its targets to the modules the checkpoint quantizes")

    def describe(self, scheme: QuantScheme) -> str:
        formats = sorted({g.format for g in scheme.groups})
        said = ", ".join(f"{g.format} ({_args(g)})" for g in scheme.groups)
        return f"compressed-tensors {'mixed-precision: ' if len(formats) > 1 else ''}{said}"

    def format_of(self, scheme: QuantScheme, module: str) -> str:
        group = group_of(scheme.groups, module)
        return f"compressed-tensors {group.format if group else 'format'}"


def group_of(groups: Sequence[ConfigGroup], module: str) -> ConfigGroup | None:
    """The config group apply_quantization_config gives `module`: the last group to name a target wins
    that target; exact names, then patterns (each kind in sorted order), then classes."""
    owner = {target: group for group in groups for target in group.targets}
    names = sorted(owner, key=lambda t: ("re:" in t, t))
    for target in names:
        if target.startswith("re:") and re.match(target[3:], module) or target == module:
            return owner[target]
    classes = [t for t in names if t[:1].isupper()]  # Linear, Embedding: any module, from names alone
    return owner[classes[0]] if classes else None


def _targets(groups: Sequence[ConfigGroup]) -> str:
    return "; ".join(f"{g.key}: {', '.join(g.targets)}" for g in groups)


def _args(group: ConfigGroup) -> str:
    a = group.args
    size = f" {a.group_size}" if a.group_size else f" {a.block[0]}×{a.block[1]}" if a.block else ""
    return f"{'' if a.symmetric else 'asymmetric '}{a.type}{a.num_bits}, {a.strategy}{size}"


METHOD = CompressedTensors()
