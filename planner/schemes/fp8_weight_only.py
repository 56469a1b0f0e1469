"""fp8-weight-only: torchao Float8WeightOnlyConfig (float8 e4m3 weights, an fp32 scale per row)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, register


def fp8_per_row_layout(out_features: int, in_features: int) -> TensorLayout:
    # Float8Tensor: float8_e4m3fn qdata and an fp32 scale per output row.
    return TensorLayout(out_features * in_features, out_features * 4, storages=2)


@register
class Fp8WeightOnly(Scheme):
    name = "fp8-weight-only"
    summary = "torchao Float8WeightOnlyConfig: float8 e4m3 weights per row"
    torchao_config = "Float8WeightOnlyConfig"

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig()

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return fp8_per_row_layout(out_features, in_features)
