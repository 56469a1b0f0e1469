"""int8-weight-only: torchao Int8WeightOnlyConfig (int8 weights per row, dequantized inside each matmul)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, register
from planner.schemes.int8_dynamic import int8_per_row_layout


@register
class Int8WeightOnly(Scheme):
    name = "int8-weight-only"
    summary = ("torchao Int8WeightOnlyConfig: int8 weights per row, dequantized to the compute dtype inside each "
               "matmul")
    torchao_config = "Int8WeightOnlyConfig"

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig()

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return int8_per_row_layout(out_features, in_features)  # the same Int8Tensor as int8-dynamic
