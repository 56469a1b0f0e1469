"""intx-weight-only: torchao IntxWeightOnlyConfig, 1-8-bit values stored unpacked (one int8 byte each)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import (
    LayerSettings,
    Scheme,
    SchemeSettings,
    TensorLayout,
    group_divides,
    int_dtype,
    register,
    unpacked_int8_layout,
)


@register
class IntxWeightOnly(Scheme):
    name = "intx-weight-only"
    summary = ("torchao IntxWeightOnlyConfig: low-bit values stored unpacked, one int8 byte each (an int4 file is "
               "int8-sized)")
    torchao_config = "IntxWeightOnlyConfig"
    settings_keys = ("group_size", "bits", "mapping")
    default_bits = 4
    caveat = "low-bit values stored unpacked, one byte each: the file is int8-sized"

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType

        return IntxWeightOnlyConfig(weight_dtype=int_dtype(settings.bits), granularity=PerGroup(settings.group_size),
                                    mapping_type=MappingType[settings.mapping.upper()])

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        # Scales follow the model dtype; zero points are int8.
        return unpacked_int8_layout(out_features, in_features, in_features // settings.group_size,
                                    settings.dtype_bytes)

    def why_not(self, out_features: int, in_features: int, settings: LayerSettings) -> str | None:
        return group_divides(in_features, settings.group_size)

    def label(self, settings: LayerSettings) -> str:
        return f"intx{settings.bits}-g{settings.group_size}"
