"""fp8-dynamic: torchao Float8DynamicActivationFloat8WeightConfig (float8 weights and activations; CUDA only)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, register
from planner.schemes.fp8_weight_only import fp8_per_row_layout


@register
class Fp8Dynamic(Scheme):
    name = "fp8-dynamic"
    summary = "torchao Float8DynamicActivationFloat8WeightConfig: float8 weights and activations"
    torchao_config = "Float8DynamicActivationFloat8WeightConfig"
    needs_cuda = "float8 dynamic activation kernels need CUDA (sm89+)"

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return Float8DynamicActivationFloat8WeightConfig()

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return fp8_per_row_layout(out_features, in_features)  # the same stored Float8Tensor as weight-only
