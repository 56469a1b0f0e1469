"""The shape of a small language model, for the tests of tied weights: an embedding, two Linear layers and a head
whose weight is the embedding's."""

import torch
from torch import nn


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(torch.relu(self.first(self.embed(ids)))))


def build() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """As a planner factory (`tests/tied_lm.py:build`): a vocabulary of 4,000 over 128 features, 16 tokens."""
    torch.manual_seed(0)
    return TiedLM(4000, 128).eval(), (torch.randint(0, 4000, (1, 16), generator=torch.Generator().manual_seed(1)),)
