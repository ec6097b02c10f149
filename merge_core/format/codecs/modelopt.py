"""NVIDIA ModelOpt's unified Hugging Face checkpoints (vLLM, SGLang and TensorRT-LLM load them): declared by
`hf_quant_config.json` beside the model, or config.json's quantization_config with quant_method
"modelopt" (config.json first, as vLLM reads them); settings in merge_core.format.codecs.mo_config.

A module is quantized when it stores `X.weight_scale`; its quant_algo (the checkpoint's, or its entry in
MIXED_PRECISION's quantized_layers) says which codec holds it: NVFP4 (mo_nvfp4), FP8 per tensor, per
channel or in blocks (mo_fp8), MXFP8 (mo_mxfp8). exclude_modules is kept as written: a weight stored
plainly merges like any bf16 tensor.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Mapping

from merge_core.errors import InputError
from merge_core.format.codecs import mo_fp8, mo_mxfp8, mo_nvfp4
from merge_core.format.codecs.checks import refusal
from merge_core.format.codecs.mo_codec import MARK, SUFFIXES, MoCodec
from merge_core.format.codecs.mo_config import algo_of, read_settings
from merge_core.format.header import TensorInfo
from merge_core.format.quantization import Method, QuantizedWeight, QuantScheme

FORMAT_CODECS: tuple[MoCodec, ...] = (mo_nvfp4.CODEC, mo_fp8.CODEC, mo_mxfp8.CODEC)
BY_ALGO = {algo: codec for codec in FORMAT_CODECS for algo in codec.algos}
ALGOS = tuple(BY_ALGO)
CONFIG_FILE = "hf_quant_config.json"
SCHEME = {"NVFP4": "e2m1 in groups of 16, e4m3 scales × weight_scale_2", "W4A16_NVFP4": "e2m1 in groups of 16, e4m3 "
          "scales × weight_scale_2", "FP8": "e4m3, per tensor", "FP8_PER_CHANNEL_PER_TOKEN": "e4m3, per channel",
          "FP8_PB_WO": "e4m3, 128×128 blocks", "MXFP8": "e4m3 in groups of 32, E8M0 scales"}


class ModelOpt(Method):
    quant_method = "modelopt"
    config_file = CONFIG_FILE

    def read_scheme(self, qc: Mapping, subject: str) -> QuantScheme:
        nested = qc.get("quantization")  # the hf_quant_config.json layout copied into config.json
        if isinstance(nested, dict):
            return read_settings(nested, f"{subject}.quantization", ALGOS, self.quant_method)
        return read_settings(qc, subject, ALGOS, self.quant_method)

    def read_config_file(self, data: object, where: str) -> QuantScheme:
        quantization = data.get("quantization") if isinstance(data, dict) else None
        return read_settings(quantization, f"{where}: quantization", ALGOS, self.quant_method)

    def group(self, scheme: QuantScheme, infos: Mapping[str, TensorInfo], where: str) -> Iterator[QuantizedWeight]:
        modules = sorted(name[: -len(MARK)] for name in infos if name.endswith(MARK))
        marked = set(modules)
        for name in infos:
            if name.endswith(SUFFIXES["global_scale"]) and name[: -len(SUFFIXES["global_scale"])] not in marked:
                raise refusal(where, name, f"has no {name.removesuffix('_2')} beside it (the block scales it "
                              "multiplies)")
        for module in modules:
            algo = algo_of(scheme, module)
            if algo is None:
                raise InputError(f"{where}: tensor {module}{MARK}", f"is a quantized weight's scale, but "
                                 f"quantized_layers has no entry for {module}", "fix quantized_layers in "
                                 "hf_quant_config.json or config.json, or re-export the checkpoint")
            codec = BY_ALGO[algo]
            yield codec.layout(module, infos, codec.algos[algo], where)

    def describe(self, scheme: QuantScheme) -> str:
        counts = Counter(layer.algo for layer in scheme.groups)
        if scheme.groups[0].module is None:
            algo = scheme.groups[0].algo
            return f"modelopt {algo} ({SCHEME[algo]})"
        said = ", ".join(f"{algo} ({SCHEME[algo]}): {n} layers" for algo, n in sorted(counts.items()))
        return f"modelopt MIXED_PRECISION: {said}"

    def format_of(self, scheme: QuantScheme, module: str) -> str:
        return f"modelopt {algo_of(scheme, module) or 'format'}"


METHOD = ModelOpt()
