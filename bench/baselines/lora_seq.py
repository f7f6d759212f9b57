"""Sequential LoRA fine-tuning: one adapter on the edited layer, trained on each new edit in turn, no routing.

The classic lifelong-editing baseline (the "LoRA" row of MELO's and GRACE's tables): every edit moves the same
weights, so later edits overwrite earlier ones and every input, edited or not, sees the change.
"""
from __future__ import annotations

from sola_core.config import TrainConfig
from sola_core.layer import RoutingState, SolaLayer, linear_shape
from sola_core.train import fit, new_adapter

from .served import Served


class SequentialLoRA(Served):
    rollback = None  # one shared adapter: an edit cannot be taken back alone

    def __init__(self, model, tokenizer, layer: str, rank: int = 4, alpha: float = 4.0,
                 train: TrainConfig | None = None) -> None:
        super().__init__(model, tokenizer)
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        self.params = new_adapter([linear_shape(base)], rank, seed=0, device=self.device)
        state = RoutingState(scaling=alpha / rank, forced=self.params)  # always on, for every input
        setattr(parent, child, SolaLayer(base, 0, state))
        self.train, self.count = train or TrainConfig(), 0
        self.trainable = rank * sum(linear_shape(base))

    def edit(self, prompt: str, target: str) -> int:
        ids, n = self.sequence(prompt, target)
        fit(self.model, ids, n, [p for pair in self.params for p in pair], self.train)
        self.count += 1
        return self.count
