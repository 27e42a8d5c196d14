"""Small models shared by several test modules."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Untraceable(nn.Module):
    """FX traces it without error into a wrong graph (``torch.jit.isinstance`` is False on
    a proxy, so the residual add is dropped), so ``prepare`` uses the torch.export fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        z = F.relu(self.b2(self.c2(y)))
        if torch.jit.isinstance(y, torch.Tensor):
            z = z + y
        return self.head(z)
