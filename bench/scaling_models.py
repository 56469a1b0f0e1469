"""Models for the speed rows of bench/run.py: GPT-2 small's shape with fewer layers (the verified-plan scaling
line, (d) rows; 12 layers is GPT-2 small itself, (b)) and a Llama-7B-shaped model for `plan --analytic-only` ((a)).

Random weights from the published configurations, nothing downloaded. The planner builds factories on the meta
device for analysis, so llama_7b never allocates its 27 GB unless something verifies it.
"""

from __future__ import annotations

import torch
from torch import nn


def _gpt2(layers: int) -> tuple[nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers)
    config.use_cache = False
    return GPT2LMHeadModel(config).eval(), torch.randint(0, config.vocab_size, (1, 128), device="cpu")


def gpt2_3_layers() -> tuple[nn.Module, torch.Tensor]:
    return _gpt2(3)


def gpt2_6_layers() -> tuple[nn.Module, torch.Tensor]:
    return _gpt2(6)


def llama_7b() -> tuple[nn.Module, torch.Tensor]:
    """Llama-2-7B's shape (hidden 4096, 32 layers, MLP 11008, vocab 32000; 6.74B parameters), token ids 1x128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000)
    config.use_cache = False
    return LlamaForCausalLM(config).eval(), torch.zeros(1, 128, dtype=torch.int64, device="cpu")
