"""Measurement primitives: resident pages of one tensor, resident memory without library pages, scratch arguments."""

import mmap
import os
from pathlib import Path

import torch

from planner.analysis.scratch import _build, resident_bytes
from planner.measure.library import private_resident_bytes, proc_status_bytes

MiB = 2**20


def test_resident_bytes_counts_the_pages_a_kernel_touched() -> None:
    # 64 MiB is above glibc's largest dynamic mmap threshold: a fresh mapping, no page touched yet.
    tensor = torch.empty(64 * MiB, dtype=torch.uint8)
    assert resident_bytes(tensor) < MiB
    tensor[: 24 * MiB].fill_(1)
    assert abs(resident_bytes(tensor) - 24 * MiB) < MiB
    assert resident_bytes(torch.empty(0)) == 0


def test_private_resident_bytes_leave_out_pages_mapped_from_files(tmp_path: Path) -> None:
    """A library's code paged in on first use is file-backed: VmRSS grows, the weights figure must not."""
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(16 * MiB))
    rss, private = proc_status_bytes("VmRSS"), private_resident_bytes()
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[offset] for offset in range(0, len(mapped), mmap.PAGESIZE)) >= 0  # touch every page
        rss_growth, private_growth = proc_status_bytes("VmRSS") - rss, private_resident_bytes() - private
    assert rss_growth > 12 * MiB and private_growth < 2 * MiB


def test_scratch_child_builds_broadcast_arguments() -> None:
    """An expanded argument (a broadcast attention mask, stride 0) overlaps itself: it is built from its storage."""
    mask = _build({"tensor": [4, 128, 128], "stride": [0, 128, 1], "dtype": "torch.bfloat16"},
                  torch.Generator().manual_seed(0))
    assert mask.shape == (4, 128, 128) and mask.stride() == (0, 128, 1) and mask.dtype == torch.bfloat16
    assert mask.untyped_storage().nbytes() == 128 * 128 * 2
