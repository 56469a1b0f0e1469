"""GPT-2 small's shape with fewer layers, for the verified-plan scaling line of bench/run.py ((d) rows).

Random weights from the published configuration, nothing downloaded; 12 layers is GPT-2 small itself ((b)).
"""

from __future__ import annotations

import torch
from torch import nn


def _gpt2(layers: int) -> tuple[nn.Module, torch.Tensor]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers)
    config.use_cache = False
    return GPT2LMHeadModel(config).eval(), torch.randint(0, config.vocab_size, (1, 128))


def gpt2_3_layers() -> tuple[nn.Module, torch.Tensor]:
    return _gpt2(3)


def gpt2_6_layers() -> tuple[nn.Module, torch.Tensor]:
    return _gpt2(6)
