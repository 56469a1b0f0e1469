"""int4-weight-only: torchao's CPU prototype PrototypeInt4WeightOnlyConfig, real 4-bit packing (Int4OpaqueTensor)."""

from __future__ import annotations

from typing import Any

from planner.schemes.base import LayerSettings, Scheme, SchemeSettings, TensorLayout, group_divides, register

# The CPU int4 pack kernel (_convert_weight_to_int4pack_for_cpu) needs out_features % 16 == 0.
PACK_ROWS = 16


@register
class Int4WeightOnly(Scheme):
    name = "int4-weight-only"
    summary = ("torchao PrototypeInt4WeightOnlyConfig: real 4-bit packing (Int4OpaqueTensor), bf16 scale and zero "
               "per group")
    torchao_config = "prototype.quantization.int4.PrototypeInt4WeightOnlyConfig"
    settings_keys = ("group_size",)
    weightless_ok = False  # it asserts a CPU weight and packs it with a CPU op
    width_multiple = PACK_ROWS
    # Int4OpaqueTensor registers itself as a weights_only-safe global only when its module is imported.
    tensor_modules = ("torchao", "torchao.prototype.quantization.int4")

    def make_config(self, settings: LayerSettings) -> Any:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=settings.group_size)

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        # Int4OpaqueTensor: two values per uint8, a scale and a zero per group in the model dtype (measured:
        # bfloat16 in a bf16 model, float32 in a float32 one).
        groups = out_features * (in_features // settings.group_size)
        return TensorLayout(out_features * in_features // 2, groups * 2 * settings.dtype_bytes, storages=2)

    def why_not(self, out_features: int, in_features: int, settings: LayerSettings) -> str | None:
        # torchao silently skips in_features % group != 0; the pack kernel fails on out_features % 16 != 0.
        if out_features % PACK_ROWS:
            return f"out_features {out_features} not divisible by {PACK_ROWS}"
        return group_divides(in_features, settings.group_size)

    def label(self, settings: LayerSettings) -> str:
        return f"int4-g{settings.group_size}"
