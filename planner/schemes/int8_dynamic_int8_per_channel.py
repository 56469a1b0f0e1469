"""8da8w: int8 dynamic activations, int8 weights per output channel (torchao Int8DynamicActivationIntxWeightConfig).

ExecuTorch's int8 dynamic recipe (torchao's Int8DynamicActivationInt8WeightConfig does not lower: aten._int_mm is
not in the core ATen opset). Measured with torchao 0.18 on torch 2.13 CPU: an IntxUnpackedToInt8Tensor with qdata
int8 (out, in), a scale (out, 1) in the model dtype and an int8 zero point (out, 1); meta works, and the
weights_only round trip is exact once torchao is imported. The eager CPU forward fake-quantizes the activations
per token and dequantizes the whole weight to the model dtype for a float matmul (unlike int8-dynamic, whose
Int8Tensor runs an int8 matmul), so its run-time memory is that of a weight-only scheme.
"""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, register, unpacked_int8_layout


@register
class Int8DynamicInt8PerChannel(Scheme):
    name = "8da8w"
    summary = ("torchao Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0)): int8 activations per token, "
               "symmetric int8 weights per output channel (ExecuTorch's int8 dynamic)")
    torchao_config = "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))"

    def make_config(self, settings: LayerSettings) -> Any:
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerAxis

        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return unpacked_int8_layout(out_features, in_features, 1, settings.dtype_bytes)  # one group per row
