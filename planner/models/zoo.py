"""Built-in example models, addressed as `zoo:NAME`.

Each builds under the caller's default device (so `with torch.device("meta")` gives
a weightless copy) and knows its example input. The first three are the classic
tutorial trio people use to reason about memory; `tinylm` and `lstm` cover the
layer types torchao leaves alone (Embedding, attention projections, LSTM).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class SimpleNet(nn.Module):
    """Linear 100→50→10: 5,560 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(100, 50)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


class ConvNet(nn.Module):
    """Two conv+pool blocks on 3×256×256, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 64 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


class ComplexNet(nn.Module):
    """Conv 3→64→128 with pools, then Linear 128·64·64→1024→10 (about 537M parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(64, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(128 * 64 * 64, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class TinyLM(nn.Module):
    """A small decoder-style transformer language model (token ids in, logits out)."""

    def __init__(self, vocab: int = 2048, d_model: int = 256, heads: int = 4, layers: int = 2,
                 context: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        block = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model,
                                           dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        seq = ids.shape[1]
        positions = torch.arange(seq, device=ids.device)
        x = self.tok(ids) + self.pos(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=ids.device, dtype=x.dtype)
        x = self.blocks(x, mask=causal, is_causal=True)
        return self.head(self.norm(x))


class LSTMTagger(nn.Module):
    """Embedding → 2-layer LSTM → linear classifier over the last state."""

    def __init__(self, vocab: int = 5000, embed: int = 128, hidden: int = 256, classes: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embed(ids))
        return self.fc(states[:, -1])


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    build: Callable[[], nn.Module]
    example_input: Callable[[int], tuple[torch.Tensor, ...]]


def _images(size: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda batch: (torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)),)


def _tokens(vocab: int, seq: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    return lambda batch: (torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)),)


ZOO: dict[str, ZooModel] = {
    model.name: model
    for model in [
        ZooModel("simplenet", "Linear 100→50→10 (5,560 parameters)", SimpleNet,
                 lambda batch: (torch.randn(batch, 100, generator=torch.Generator().manual_seed(0)),)),
        ZooModel("convnet", "two conv+pool blocks on 3×256×256, linear classifier", ConvNet, _images(256)),
        ZooModel("complexnet", "conv 3→64→128, Linear 524,288→1024→10 (537M parameters, 2.1 GB fp32)",
                 ComplexNet, _images(256)),
        ZooModel("tinylm", "2-layer transformer LM, vocab 2048, d_model 256, 128 tokens", TinyLM,
                 _tokens(2048, 128)),
        ZooModel("lstm", "Embedding → 2-layer LSTM(256) → Linear, 64 tokens", LSTMTagger, _tokens(5000, 64)),
    ]
}
