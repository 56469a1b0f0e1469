"""--analytic-only never builds real weights, for any recipe: a transformers LM (default config, KV cache on) is
structurally pruned on meta; a model whose forward cannot run on meta becomes an unsupported row with the reason,
where a verified plan would prune an uninitialised CPU copy."""

import json
from pathlib import Path

import pytest
import torch

from planner.analysis import pruning
from planner.cli.commands import main

FACTORY = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM

def build():
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000)  # GQA, use_cache left at its default
    return LlamaForCausalLM(config), torch.zeros(1, 16, dtype=torch.int64)

"""


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str) -> dict[str, dict[str, object]]:
    (tmp_path / "lm.py").write_text(FACTORY)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an analytic-only plan built real tensors")

    monkeypatch.setattr(pruning, "_pruned_stand_in", refuse)
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)
    code = main(["plan", f"{tmp_path / 'lm.py'}:{factory}", "--budget", "100MB", "--budget-on", "runtime",
                 "--analytic-only", "--recipes", "fp32,struct50,int8-dynamic", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "out" / "plan.json").read_text())["rows"]}
    assert rows["fp32"]["status"] == "estimated" and rows["int8-dynamic"]["status"] == "estimated"
    return rows


def test_analytic_only_prunes_a_transformers_lm_on_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _plan(tmp_path, monkeypatch, "build")
    assert rows["struct50"]["status"] == "estimated"
    assert rows["struct50"]["analytic_weight_bytes"] < 0.6 * rows["fp32"]["analytic_weight_bytes"]


def test_analytic_only_never_materializes_to_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward that cannot run on meta (as transformers' mask code could not, before
    hf_folder.meta_sequences_unpacked): here the pruning on meta is made to fail as it did."""
    prune_channels = pruning.prune_channels

    def fails_on_meta(model: torch.nn.Module, *args: object, weightless: bool = False) -> object:
        if any(parameter.is_meta for parameter in model.parameters()):
            raise pruning.UnsupportedRecipe("torch-pruning cannot prune this model weightless (meta): RuntimeError: "
                                            "Tensor.item() cannot be called on meta tensors")
        return prune_channels(model, *args, weightless=weightless)

    monkeypatch.setattr(pruning, "prune_channels", fails_on_meta)
    rows = _plan(tmp_path, monkeypatch, "build")
    assert rows["struct50"]["status"] == "unsupported"
    assert "--analytic-only never builds one" in rows["struct50"]["note"]
