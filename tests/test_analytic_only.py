"""--analytic-only never builds real weights, for any recipe: structured pruning of a transformers LM (default
config, KV cache on) whose forward cannot run on meta becomes an unsupported row with the reason, where a
verified plan would prune an uninitialised CPU copy."""

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
    config = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000)  # GQA, use_cache left at its default
    return LlamaForCausalLM(config), torch.zeros(1, 16, dtype=torch.int64)
"""


def test_analytic_only_never_materializes_to_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lm.py").write_text(FACTORY)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an analytic-only plan built real tensors")

    monkeypatch.setattr(pruning, "_pruned_stand_in", refuse)
    monkeypatch.setattr(torch.nn.Module, "to_empty", refuse)
    code = main(["plan", f"{tmp_path / 'lm.py'}:build", "--budget", "100MB", "--budget-on", "runtime",
                 "--analytic-only", "--recipes", "fp32,struct50,int8-dynamic", "--out", str(tmp_path / "out")])
    assert code == 0
    rows = {row["recipe"]: row for row in json.loads((tmp_path / "out" / "plan.json").read_text())["rows"]}
    assert rows["fp32"]["status"] == "estimated" and rows["int8-dynamic"]["status"] == "estimated"
    assert rows["struct50"]["status"] == "unsupported"
    assert "--analytic-only never builds one" in rows["struct50"]["note"]
