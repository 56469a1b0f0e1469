"""8da4w: int8 dynamic activations, int4 grouped weights (torchao Int8DynamicActivationIntxWeightConfig).

The ExecuTorch/XNNPACK standard (its export names it 8da4w). Measured with torchao 0.18 on torch 2.13 CPU:
the weight becomes an IntxUnpackedToInt8Tensor with qdata int8 (out, in), one byte per 4-bit value, a scale
(out, in / group) in the model dtype and an int8 zero point of the same shape (stored although the mapping
is symmetric). quantize_ works on the meta device; torch.save then torch.load(weights_only=True, mmap=True)
round-trips it bit for bit once torchao is imported. The eager CPU forward quantizes and dequantizes the
activations per token, then dequantizes the whole weight to the model dtype and runs a float matmul: its
memory is that of intx-weight-only (the liveness trace sees the dequantized copy). Packing two values per
byte is what XNNPACK does when the model is lowered to ExecuTorch, not what the torch artifact stores.
"""

from __future__ import annotations

from typing import Any

from planner.schemes.base import (
    LayerSettings,
    Scheme,
    SchemeSettings,
    TensorLayout,
    group_divides,
    register,
    unpacked_int8_layout,
)


@register
class Int8DynamicInt4Grouped(Scheme):
    name = "8da4w"
    summary = ("torchao Int8DynamicActivationIntxWeightConfig(int4, PerGroup): int8 activations per token, "
               "symmetric 4-bit weights per group, stored one per int8 byte (ExecuTorch/XNNPACK packs them)")
    torchao_config = "Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(g))"
    settings_keys = ("group_size",)  # bits are 4 and the mapping symmetric by definition
    caveat = "4-bit values stored unpacked, one byte each, in torch: the file is int8-sized"

    def make_config(self, settings: LayerSettings) -> Any:
        import torch
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig
        from torchao.quantization.granularity import PerGroup

        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                     weight_granularity=PerGroup(settings.group_size))

    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        return unpacked_int8_layout(out_features, in_features, in_features // settings.group_size,
                                    settings.dtype_bytes)

    def why_not(self, out_features: int, in_features: int, settings: LayerSettings) -> str | None:
        return group_divides(in_features, settings.group_size)  # torchao asserts whole groups

    def label(self, settings: LayerSettings) -> str:
        return f"8da4w-g{settings.group_size}"
