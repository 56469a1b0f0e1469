"""Giving back the reference file's pages while a recipe is applied layer by layer (planner.core.pages)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from planner.core.pages import PAGE_BYTES, MappedReference, private_file_ranges, still_mapped, unused_pages
from planner.recipes.recipe import PruneThresholds, Recipe, apply_recipe, import_tensor_types


def test_unused_pages_keeps_every_page_a_tensor_touches() -> None:
    page = 4096
    mapped = [(0, 10 * page)]
    # A tensor inside page 1 only partly, one spanning pages 4-6, one outside the mapping.
    used = [(page + 100, page + 200), (4 * page + 8, 6 * page + 1), (20 * page, 21 * page)]
    assert unused_pages(mapped, used, page) == [(0, page), (2 * page, 4 * page), (7 * page, 10 * page)]
    assert unused_pages(mapped, [], page) == mapped
    assert unused_pages(mapped, [(0, 10 * page)], page) == []


def test_private_file_ranges_reads_only_private_mappings_of_that_file(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    maps = (f"7f00-7f80 rw-p 00000000 fe:00 1  {path}\n"
            f"7f80-7fa0 rw-s 00000000 fe:00 1  {path}\n"
            f"7fa0-7fb0 r--p 00000000 fe:00 2  {path}.other\n"
            "7fb0-7fc0 rw-p 00000000 00:00 0\n")
    assert private_file_ranges(path, maps) == [(0x7F00, 0x7F80)]


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(512, 256)
        self.layers = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)])
        self.head = nn.Linear(256, 512, bias=False)
        self.head.weight = self.embed.weight  # tied, as GPT-2's lm_head and wte

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(tokens)))


def _mapping_rss_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            inside = len(fields) == 6 and fields[5] == str(path.resolve())
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def _load(path: Path) -> Stack:
    model = Stack().to("meta")
    model.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
    model.head.weight = model.embed.weight
    return model.eval()


@pytest.mark.parametrize("recipe", [
    Recipe("int8-weight-only", quantize="int8-weight-only"),
    Recipe("bf16", dtype="bfloat16"),
    Recipe("prune50-int8-dynamic", quantize="int8-dynamic", prune=0.5),
], ids=lambda recipe: recipe.name)
def test_released_pages_do_not_change_the_result_and_leave_the_process(tmp_path: Path, recipe: Recipe) -> None:
    if not Path("/proc/self/smaps").exists():
        pytest.skip("needs Linux /proc to see resident pages")
    import_tensor_types()
    torch.manual_seed(0)
    path = tmp_path / "fp32.pt"
    torch.save(Stack().state_dict(), path)
    tokens = torch.randint(0, 512, (2, 16))

    kept, _ = apply_recipe(_load(path), recipe)  # the whole reference stays mapped
    with torch.inference_mode():
        expected = kept(tokens)

    model = _load(path)
    mapped = MappedReference(path)
    assert mapped.ranges, "the reference should be memory-mapped"
    released, _ = apply_recipe(model, recipe, after_layer=mapped.release_unused)
    assert mapped.released_calls > 0
    resident = _mapping_rss_bytes(path)
    # Only the tied embedding (kept float32; pruned in place where the recipe prunes) may stay resident,
    # plus the partly used pages at tensor edges.
    still_used = model.embed.weight.numel() * model.embed.weight.element_size() if recipe.dtype == "float32" else 0
    assert resident <= still_used + 16 * PAGE_BYTES, (resident, still_used)
    with torch.inference_mode():
        assert torch.equal(released(tokens), expected)
    if recipe.prune:  # the embedding was pruned in place through the tied head: the release kept those writes
        assert float((model.embed.weight == 0).float().mean()) >= 0.5


def test_prune_thresholds_are_searched_once_per_layer_and_share() -> None:
    torch.manual_seed(0)
    thresholds: PruneThresholds = {}
    reference = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    a, _ = apply_recipe(_copy(reference), Recipe("p", prune=0.5), prune_thresholds=thresholds)
    assert set(thresholds) == {("0", 0.5, 0.0, 0.0, (64, 64)), ("2", 0.5, 0.0, 0.0, (8, 64))}
    b, _ = apply_recipe(_copy(reference), Recipe("p8", prune=0.5, quantize="int8-weight-only"),
                        prune_thresholds=thresholds)
    c, _ = apply_recipe(_copy(reference), Recipe("p8", prune=0.5, quantize="int8-weight-only"))
    # Pruning only zeroes: every weight it kept is the reference's.
    assert torch.equal(a[0].weight, reference[0].weight.masked_fill(a[0].weight == 0, 0))
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert torch.equal(b(x), c(x))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_only_ranges_still_mapped_are_released() -> None:
    """torch unmaps the reference once no tensor uses it; its addresses may then hold anything (a fresh int4 build
    process segfaulted when the old range was madvised)."""
    assert still_mapped([(0, 8192), (16384, 32768)], [(16384, 32768), (40960, 49152)]) == [(16384, 32768)]
    assert still_mapped([(0, 8192)], []) == []
