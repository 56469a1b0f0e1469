"""int8-dynamic: torchao Int8DynamicActivationInt8WeightConfig (int8 weights per row, int8 activations per token)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, register


def int8_per_row_layout(out_features: int, in_features: int) -> TensorLayout:
    # Int8Tensor: int8 qdata, an fp32 scale and an int8 zero point per output row.
    return TensorLayout(out_features * in_features, out_features * 4 + out_features, storages=3)


@register
class Int8Dynamic(Scheme):
    name = "int8-dynamic"
    summary = ("torchao Int8DynamicActivationInt8WeightConfig: int8 weights per row, activations quantized to int8 "
               "on the fly")
    torchao_config = "Int8DynamicActivationInt8WeightConfig"

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return int8_per_row_layout(out_features, in_features)
