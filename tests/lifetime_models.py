"""Models for the lifetime-peak tests and comparisons: ComplexNet's shape (planner.zoo) at smaller sizes."""

import torch
from torch import nn


class ConvThenDense(nn.Module):
    """Conv 3→64→128 with pools, then Linear 128·(side/4)²→1024→10: zoo:complexnet's layers for a side×side
    image (complexnet is side 256, 2.1 GB in float32)."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(128 * (side // 4) ** 2, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _build(side: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    image = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0), device="cpu")
    return ConvThenDense(side).eval(), image


def complexnet_64() -> tuple[nn.Module, torch.Tensor]:
    """33.6M parameters, 134 MB in float32."""
    return _build(64)


def complexnet_128() -> tuple[nn.Module, torch.Tensor]:
    """134M parameters, 537 MB in float32."""
    return _build(128)
