"""Models sized for training-memory checks: large enough that a training step's memory is well above the noise of
resident-memory measurement (tens to hundreds of MB), small enough to train on a laptop CPU.

Use them as ``planner inspect examples/training_models.py:mlp_100m --mode train --optimizer adamw --verify``.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp_100m() -> tuple[nn.Module, torch.Tensor]:
    """Linear 1024→4096→4096→1024 with ReLUs: 25.2M parameters, 101 MB in float32."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    example = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0), device="cpu")
    return model, example


def mlp_16m() -> tuple[nn.Module, torch.Tensor]:
    """Linear 1024→2048→1024 with a ReLU: 4.2M parameters, 16.8 MB in float32 (the end-to-end test's model)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 1024))
    example = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0), device="cpu")
    return model, example
