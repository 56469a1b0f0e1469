"""Give back the pages of the memory-mapped float32 reference that a recipe no longer needs.

The planner applies each recipe to the reference loaded with torch.load(mmap=True): a private file mapping,
so a weight costs resident memory only once read. Casting or quantizing reads every weight, and the pages
stay resident while the mapping lives, so without help the planner would hold the whole float32 model
besides the recipe's copy. After each layer, the pages no tensor of the model still uses are dropped with
madvise(MADV_DONTNEED): clean pages of a private file mapping come back from the file if touched again, and
a page written in place (magnitude pruning) is dropped only once no model tensor uses it any more.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

MADV_DONTNEED = 4
PAGE_BYTES = mmap.PAGESIZE


def private_file_ranges(path: str | Path, maps_text: str | None = None) -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's private mappings of `path` (from /proc/self/maps)."""
    wanted = os.path.realpath(path)
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: nothing is released, nothing breaks
            return []
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == wanted and fields[1].endswith("p"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def still_mapped(ranges: list[tuple[int, int]], now: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges of a file's mapping that are still mapped from that file now (a range is one mapping: torch
    unmaps it whole)."""
    current = set(now)
    return [span for span in ranges if span in current]


def unused_pages(mapped: list[tuple[int, int]], used: list[tuple[int, int]],
                 page: int = PAGE_BYTES) -> list[tuple[int, int]]:
    """The page-aligned parts of `mapped` that no `used` byte range touches (a page partly used is kept)."""
    free = []
    widened = sorted((start // page * page, -(-end // page) * page) for start, end in used if end > start)
    for map_start, map_end in mapped:
        cursor = map_start
        for start, end in widened:
            if end <= cursor or start >= map_end:
                continue
            if start > cursor:
                free.append((cursor, start))
            cursor = max(cursor, end)
        if cursor < map_end:
            free.append((cursor, map_end))
    return free


def _storage_ranges(tensor: torch.Tensor) -> list[tuple[int, int]]:
    if is_traceable_wrapper_subclass(tensor):  # a torchao tensor: the tensors it wraps
        names, _ = tensor.__tensor_flatten__()
        return [span for name in names for span in _storage_ranges(getattr(tensor, name))]
    if tensor.device.type != "cpu":
        return []
    storage = tensor.untyped_storage()
    return [(storage.data_ptr(), storage.data_ptr() + storage.nbytes())]


def model_ranges(model: nn.Module) -> list[tuple[int, int]]:
    tensors = [*model.parameters(), *model.buffers()]
    return [span for tensor in tensors for span in _storage_ranges(tensor)]


class MappedReference:
    """The mapping of one reference file in this process; `release_unused(model)` after each layer."""

    def __init__(self, path: str | Path) -> None:
        self.path = path
        self.ranges = private_file_ranges(path)
        self.released_calls = 0

    def release_unused(self, model: nn.Module) -> None:
        if not self.ranges:
            return
        # torch unmaps the file once no tensor uses it, and the addresses go to whatever is allocated next (a
        # fresh build process quantizing int4 imports torch._inductor there): madvise on the old range would
        # zero someone else's memory. Only the mappings still in place are released.
        self.ranges = still_mapped(self.ranges, private_file_ranges(self.path))
        libc = ctypes.CDLL(None, use_errno=True)
        for start, end in unused_pages(self.ranges, model_ranges(model)):
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED)
        self.released_calls += 1
