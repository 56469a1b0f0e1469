"""The KV cache a causal LM's `generate()` holds: the formula, the geometry it reads from the model's config, and
the bytes a real (or fake) cache object holds.

transformers' default cache is `DynamicCache`: per layer one key and one value tensor of shape
[batch, kv_heads, tokens, head_dim] in the model's compute dtype, grown by `torch.cat` at every step. A layer with
a sliding window (`DynamicSlidingWindowLayer`) keeps a view of its last `window - 1` tokens of the concatenation,
whose storage (`window` tokens once full) stays resident. Which class each layer gets is transformers' own decision
from the config (`DynamicCache(config=...)`), so the geometry is read from the cache it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

FULL = "full"  # a DynamicLayer: every token stays
SLIDING = "sliding"  # a DynamicSlidingWindowLayer: the last `window` tokens stay resident
NONE = "none"  # a layer that stores nothing (KV sharing, MLP/MoE-only layers)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """Keys and values of `tokens` positions in `layers` layers: 2 × layers × kv_heads × head_dim × tokens × bytes."""
    return 2 * layers * kv_heads * head_dim * tokens * dtype_bytes * batch


def resident_tokens(tokens: int, window: int | None) -> int:
    """Positions a layer's cache storage holds after `tokens` positions have gone through it. A sliding-window
    layer keeps a view of the last window - 1 positions of a concatenation of window positions (its storage)."""
    return tokens if window is None else min(tokens, window)


@dataclass(frozen=True)
class KvGeometry:
    """What the formula needs, per layer of the decoder: its kind (FULL, SLIDING, NONE) and window."""

    kv_heads: int
    head_dim: int
    kinds: tuple[str, ...]
    windows: tuple[int | None, ...]
    unmodelled: tuple[str, ...] = ()  # cache layer classes the formula does not know (their bytes are left out)

    @property
    def layers(self) -> int:
        return len(self.kinds)


def cache_bytes(geometry: KvGeometry, tokens: int, dtype_bytes: int, batch: int = 1) -> int:
    """The cache's resident bytes once `tokens` positions went through every layer."""
    return sum(kv_cache_bytes(1, geometry.kv_heads, geometry.head_dim, resident_tokens(tokens, window), dtype_bytes,
                              batch)
               for kind, window in zip(geometry.kinds, geometry.windows, strict=True) if kind != NONE)


def kv_geometry(config: Any) -> KvGeometry:
    """The decoder's KV geometry from a transformers config: heads from the config, layer kinds from the
    DynamicCache transformers builds for it (no tensors are made for full layers)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    cache = DynamicCache(config=text)
    layers = cache.layers if cache.layers else [DynamicLayer() for _ in range(text.num_hidden_layers)]
    kinds: list[str] = []
    windows: list[int | None] = []
    unmodelled: list[str] = []
    for layer in layers:
        if isinstance(layer, DynamicSlidingWindowLayer):
            kinds.append(SLIDING)
            windows.append(int(layer.sliding_window))
        elif type(layer) is DynamicLayer:
            kinds.append(FULL)
            windows.append(None)
        else:
            kinds.append(NONE)
            windows.append(None)
            if type(layer).__name__ != "DummyLayer":
                unmodelled.append(type(layer).__name__)
    return KvGeometry(kv_heads, head_dim, tuple(kinds), tuple(windows), tuple(sorted(set(unmodelled))))


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a transformers cache object holds (keys, values and whatever else its layers keep)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # an older cache layout, or a tuple of (key, value) pairs
        layers = [cache] if not isinstance(cache, list | tuple) else cache
    found: list[torch.Tensor] = []
    for layer in layers:
        values = layer if isinstance(layer, list | tuple) else vars(layer).values()
        found += [value for value in values if isinstance(value, torch.Tensor)]
    return found


def held_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the storages behind the tensors, each storage once (a sliding layer's keys are a view)."""
    storages: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())
