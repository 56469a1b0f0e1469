"""The Scheme interface: everything the planner knows about one torchao weight-quantization scheme.

Shaped like torchao's quant_api (a config dataclass plus a handler registered for it): each scheme is one
file in this package holding one `Scheme` subclass, registered with `@register`. The footprint (stored
bytes per layer), the weightless liveness trace (how to quantize on the meta device), the real apply (the
torchao config), the recipe parser (defaults, which keys matter) and every `unsupported` reason a scheme
owns (a layer it cannot take, a missing CUDA kernel) ask the same object, so adding a scheme torchao has
is one new file here plus a [[recipe]] entry in a TOML file.

This module imports torch only (torchao inside the methods that build configs): the planner's analysis and
runtime modules import it, never the other way round.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


class LayerSettings(Protocol):
    """The per-layer knobs a scheme reads (a Recipe and a LayerOverride both have them)."""

    @property
    def bits(self) -> int: ...

    @property
    def group_size(self) -> int: ...

    @property
    def mapping(self) -> str: ...


class SchemeSettings(LayerSettings, Protocol):
    """Per-layer knobs plus the model dtype, which sets the dtype of most schemes' scales (a Recipe has both)."""

    @property
    def dtype_bytes(self) -> int: ...


@dataclass(frozen=True)
class TensorLayout:
    """Bytes of one quantized weight as torchao stores it: payload plus scales and zero-points."""

    payload_bytes: int
    scale_bytes: int
    storages: int  # tensors written to disk for this weight (each costs container overhead)

    @property
    def total_bytes(self) -> int:
        return self.payload_bytes + self.scale_bytes


class Scheme(ABC):
    """One torchao weight-quantization scheme. Subclass it in a file of this package and decorate with @register.

    Class attributes say what the scheme is; methods answer per layer. Every method takes the layer's shape as
    (out_features, in_features), the nn.Linear convention, and the settings of the recipe (or layer override)
    that chose the scheme."""

    name: ClassVar[str]  # the `quantize = "..."` value in a recipe file
    summary: ClassVar[str]  # one line for `planner recipes` and the docs
    torchao_config: ClassVar[str]  # the torchao config class it builds, for the docs
    # Which recipe keys change this scheme's result (the others are ignored): a mixed recipe writes only these.
    settings_keys: ClassVar[tuple[str, ...]] = ()
    default_bits: ClassVar[int] = 8  # `bits` when a recipe leaves it out
    needs_cuda: ClassVar[str | None] = None  # reason, when the scheme has no CPU kernel
    # quantize_ runs on a meta-device weight. False: it asserts a CPU weight and packs it with a CPU op, so the
    # weightless model is quantized on storage-less FakeTensors that claim the CPU (planner.analysis.footprint).
    weightless_ok: ClassVar[bool] = True
    caveat: ClassVar[str] = ""  # said in every row that uses the scheme
    # Structured pruning keeps the widths it leaves a multiple of this, so the pruned layers stay quantizable.
    width_multiple: ClassVar[int | None] = None
    # Modules whose import registers this scheme's tensor subclasses as weights_only-safe globals.
    tensor_modules: ClassVar[tuple[str, ...]] = ("torchao",)

    @abstractmethod
    def make_config(self, settings: LayerSettings) -> Any:
        """The torchao config that quantize_ applies to each selected layer."""

    @abstractmethod
    def layout(self, out_features: int, in_features: int, settings: SchemeSettings) -> TensorLayout:
        """The bytes torchao stores for one (out_features, in_features) weight, measured against real tensors."""

    def why_not(self, out_features: int, in_features: int, settings: LayerSettings) -> str | None:
        """Why this layer cannot take the scheme (it stays in the model dtype, and the row says so); None if it can."""
        return None

    def label(self, settings: LayerSettings) -> str:
        """A short name for one layer's precision (mixed precision: `int4-g128 on 12 layer(s)`)."""
        return self.name

    def missing_kernel(self) -> str | None:
        """Why the scheme cannot run on this machine (no CUDA for a CUDA-only kernel); None when it can."""
        if self.needs_cuda and not torch.cuda.is_available():
            return self.needs_cuda
        return None

    def quantize_layer(self, model: nn.Module, fqn: str, settings: LayerSettings) -> None:
        """Quantize the one module `fqn` of a real (or meta) model in place, as torchao does."""
        from torchao.quantization import quantize_

        quantize_(model, self.make_config(settings), filter_fn=lambda module, name: name == fqn)

    def import_tensor_types(self) -> None:
        """Import what weights_only loading needs to accept this scheme's tensors."""
        for module in self.tensor_modules:
            importlib.import_module(module)


# Filled by @register as the scheme files of this package are imported (planner.schemes imports them all).
REGISTRY: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: one instance of the scheme, findable by its name. A name registered twice is a bug."""
    scheme = cls()
    if scheme.name in REGISTRY and type(REGISTRY[scheme.name]) is not cls:
        raise ValueError(f"two schemes named {scheme.name!r}: {type(REGISTRY[scheme.name]).__name__} and "
                         f"{cls.__name__}")
    REGISTRY[scheme.name] = scheme
    return cls


# ---- layout and constraint helpers several scheme files share ----

def group_divides(in_features: int, group_size: int) -> str | None:
    """torchao skips (or asserts on) a weight whose rows do not split into whole groups."""
    if in_features % group_size:
        return f"in_features {in_features} not divisible by group {group_size}"
    return None


def unpacked_int8_layout(out_features: int, in_features: int, groups_per_row: int, scale_bytes: int
                         ) -> TensorLayout:
    """IntxUnpackedToInt8Tensor (qdata, scale, zero_point): one int8 byte per value whatever the bit width, and
    per group a scale of `scale_bytes` plus an int8 zero point (stored even for a symmetric mapping)."""
    groups = out_features * groups_per_row
    return TensorLayout(out_features * in_features, groups * (scale_bytes + 1), storages=3)


def int_dtype(bits: int) -> torch.dtype:
    """torch.int1 ... torch.int8, the weight_dtype torchao's intx configs take."""
    return getattr(torch, f"int{bits}")

