"""Sequential LoRA fine-tuning: one adapter on the edited layer, trained on each new edit in turn, no routing.

The classic lifelong-editing baseline (the "LoRA" row of MELO's and GRACE's tables): every edit moves the same
weights, so later edits overwrite earlier ones and every input, edited or not, sees the change.
"""
from __future__ import annotations

import torch
from torch import nn

from sola_core.config import TrainConfig
from sola_core.layer import linear_shape
from sola_core.models import parent_of
from sola_core.train import fit, new_adapter

from .served import Served


class SharedLoRA(nn.Module):
    """One LoRA adapter on a frozen linear, applied to every input: `base(x) + scaling * B A x`."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base_layer, self.A, self.B, self.scaling = base, A, B, scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * (x @ self.A.T @ self.B.T)


class SequentialLoRA(Served):
    rollback = None  # one shared adapter: an edit cannot be taken back alone

    def __init__(self, model, tokenizer, layer: str, rank: int = 4, alpha: float = 4.0,
                 train: TrainConfig | None = None) -> None:
        super().__init__(model, tokenizer)
        parent, child = parent_of(model, layer)
        base = getattr(parent, child)
        self.params = new_adapter([linear_shape(base)], rank, seed=0, device=self.device)
        setattr(parent, child, SharedLoRA(base, *self.params[0], scaling=alpha / rank))
        self.train, self.count = train or TrainConfig(), 0
        self.trainable = rank * sum(linear_shape(base))

    def edit(self, prompt: str, target: str, form: str = "completion") -> int:  # every form trained alike
        ids, n = self.sequence(prompt, target)
        fit(self.model, [[(ids, n)]], [p for pair in self.params for p in pair], self.train)
        self.count += 1
        return self.count
