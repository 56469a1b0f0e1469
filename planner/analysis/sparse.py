"""Sparse storage for unstructured (magnitude) pruning: a pruned weight is stored in whichever of three forms
is smallest on disk, decided per tensor by the same arithmetic before pruning (analytic) and after (real):

- dense:   n values;
- bitmask: one bit per position (packed uint8) plus the nnz nonzero values;
- indices: the nnz flat positions as int16 (n <= 32768) or int32, plus the nnz values.

Each sparse form writes two tensors instead of one, so it also pays one more torch.save record. The loader
densifies at load time: the file shrinks, the resident weights do not (no sparse kernels run here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy
import torch
from torch import nn

from planner.analysis.footprint import CONTAINER_BYTES_PER_STORAGE

SEPARATOR = "::"
FORMATS = ("dense", "bitmask", "indices")
SELECT_CHUNK = 1 << 22


@dataclass(frozen=True)
class SparseChoice:
    format: str
    payload_bytes: int  # bytes written for this tensor (values, mask or indices)
    storages: int  # tensors written for it

    @property
    def disk_bytes(self) -> int:
        return self.payload_bytes + self.storages * CONTAINER_BYTES_PER_STORAGE


def index_bytes(numel: int) -> int:
    return 2 if numel <= 1 << 15 else 4


def choose_format(numel: int, nonzeros: int, value_bytes: int) -> SparseChoice:
    """The smallest stored form for a tensor with `nonzeros` of `numel` values nonzero; dense on ties."""
    candidates = [
        SparseChoice("dense", numel * value_bytes, 1),
        SparseChoice("bitmask", math.ceil(numel / 8) + nonzeros * value_bytes, 2),
        SparseChoice("indices", nonzeros * (index_bytes(numel) + value_bytes), 2),
    ]
    return min(candidates, key=lambda choice: (choice.disk_bytes, FORMATS.index(choice.format)))


def crossover_sparsity(numel: int, value_bytes: int, sparse_format: str = "bitmask") -> float | None:
    """The smallest share of zeros at which `sparse_format` beats dense for this tensor (None: never)."""
    for zeros in range(0, numel + 1, max(1, numel // 10_000)):
        choice = choose_format(numel, numel - zeros, value_bytes)
        if choice.format == sparse_format or (choice.format != "dense" and sparse_format == "any"):
            return zeros / numel
    return None


def nonzeros_after_magnitude_pruning(numel: int, fraction: float) -> int:
    """magnitude_threshold zeroes the ceil(fraction·n) smallest values (exactly, for untied magnitudes)."""
    return numel - math.ceil(fraction * numel)


def _pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """Bit i of byte j is position 8j + i (little bit order), as _unpack_bitmask reads it."""
    return torch.from_numpy(numpy.packbits(mask.numpy(), bitorder="little"))


def _unpack_bitmask(mask: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((mask.unsqueeze(1) >> shifts) & 1).view(-1)[:numel].bool()


def encode(tensor: torch.Tensor, value_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """{suffix: tensor} for the smallest form of `tensor` (suffix "" means dense, stored as is)."""
    flat = tensor.detach().reshape(-1)
    nonzero = flat != 0  # one pass: counted, then reused for the values and the mask or the indices
    kept = int(torch.count_nonzero(nonzero))
    choice = choose_format(flat.numel(), kept, value_bytes or tensor.element_size())
    if choice.format == "dense":
        return {"": tensor}
    values = _select_by_chunk(flat, nonzero, kept, lambda chunk, keep, start: chunk[keep], flat.dtype)
    if choice.format == "bitmask":
        return {"bitmask": _pack_bitmask(nonzero), "values": values}
    dtype = torch.int16 if index_bytes(flat.numel()) == 2 else torch.int32
    indices = _select_by_chunk(flat, nonzero, kept, lambda chunk, keep, start: torch.nonzero(keep).view(-1) + start,
                               dtype)
    return {"indices": indices, "values": values}


def _select_by_chunk(flat: torch.Tensor, keep: torch.Tensor, kept: int,
                     pick: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor], dtype: torch.dtype
                     ) -> torch.Tensor:
    """pick(chunk, keep_chunk, chunk_start) over chunks, written into one preallocated tensor: boolean indexing
    goes through int64 positions of every kept value (8 bytes each, twice the float32 values) at once otherwise."""
    selected = torch.empty(kept, dtype=dtype)
    offset = 0
    for start in range(0, flat.numel(), SELECT_CHUNK):
        part = pick(flat[start:start + SELECT_CHUNK], keep[start:start + SELECT_CHUNK], start)
        selected[offset:offset + part.numel()] = part
        offset += part.numel()
    return selected


def decode(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    numel = math.prod(shape)
    values = parts["values"]
    dense = torch.zeros(numel, dtype=values.dtype)
    if "bitmask" in parts:
        dense.masked_scatter_(_unpack_bitmask(parts["bitmask"], numel), values)
    else:
        dense[parts["indices"].long()] = values
    return dense.view(shape)


def pack_state_dict(state: dict[str, torch.Tensor], pruned_keys: set[str]) -> dict[str, torch.Tensor]:
    """The state dict with each pruned plain weight in its smallest form (KEY::bitmask + KEY::values, ...).
    A key sharing storage with a pruned weight (a tied embedding) reuses its parts, so it is stored once."""
    encoded: dict[tuple[int, tuple[int, ...]], dict[str, torch.Tensor]] = {}
    for key in pruned_keys & set(state):
        tensor = state[key]
        if type(tensor) in (torch.Tensor, nn.Parameter):
            encoded.setdefault((tensor.data_ptr(), tuple(tensor.shape)), encode(tensor))
    packed: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = encoded.get((tensor.data_ptr(), tuple(tensor.shape))) if type(tensor) in (torch.Tensor,
                                                                                          nn.Parameter) else None
        for suffix, part in (parts or {"": tensor}).items():
            packed[f"{key}{SEPARATOR}{suffix}" if suffix else key] = part
    return packed


def unpack_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Densify every KEY::values entry back into KEY, with the shape the model's (meta) tensor has."""
    if not any(SEPARATOR in key for key in state):
        return state
    shapes = {key: value.shape for key, value in model.state_dict(keep_vars=True).items()}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if SEPARATOR in key:
            name, suffix = key.rsplit(SEPARATOR, 1)
            grouped.setdefault(name, {})[suffix] = tensor
        else:
            dense[key] = tensor
    decoded: dict[int, torch.Tensor] = {}  # a tied weight's keys share their parts: decode once, stay tied
    for name, parts in grouped.items():
        key = id(parts["values"])
        if key not in decoded:
            decoded[key] = decode(parts, shapes[name])
        dense[name] = decoded[key]
    return dense


def pruned_weight_keys(model: nn.Module, recipe: object) -> set[str]:
    """State-dict keys of the weights the recipe's magnitude pruning touched (one name per tied weight)."""
    from planner.recipes.recipe import prunable

    keys = set()
    for name, module in model.named_modules():
        if prunable(module, recipe):  # type: ignore[arg-type]
            keys.add(f"{name}.weight" if name else "weight")
    return keys
