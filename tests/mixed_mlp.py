"""A small MLP for the mixed-precision tests: one large middle layer and two smaller ones, every Linear
shaped for the 4-bit kernel (out % 16, in % 128), so uniform int8 misses a budget that a mix can meet."""

import torch
from torch import nn


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 256))
    example = torch.randn(8, 256, generator=torch.Generator().manual_seed(1), device="cpu")
    return model, (example,)
