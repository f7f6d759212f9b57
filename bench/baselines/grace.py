"""GRACE (Hartvigsen et al., NeurIPS 2023): a codebook of (key, value, deferral radius) wrapped around one layer.

Key = the layer's input at the last prompt token; Euclidean distance. Within the nearest entry's radius the
layer's output is *replaced* by that entry's trained value (from the last prompt token on); otherwise the layer
defers to the base model. Codebook rules from the paper: a key farther than eps_init + the nearest radius starts
a new entry; a nearby key with the same answer widens the nearest radius to cover it; a nearby key with a
different answer starts a new entry and both radii shrink to half the distance between them.
"""
from __future__ import annotations

import torch
from torch import nn

from sola_core.config import TrainConfig
from sola_core.models import parent_of
from sola_core.routing import Prompt, PromptPasses
from sola_core.train import fit

from .served import Served


class GraceLayer(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.keys: list[torch.Tensor] = []  # each (in,)
        self.values: list[torch.Tensor] = []  # each (out,)
        self.radii: list[float] = []
        self.labels: list[str] = []
        self.positions: torch.Tensor | None = None  # (B,) last prompt token, set per prompt pass
        self.hits: list[int | None] = []  # codebook entry per row, decided on the prompt pass
        self.decide = False
        self.forced: tuple[int, torch.Tensor] | None = None  # (start position, value being trained)

    def nearest(self, query: torch.Tensor) -> tuple[float, int]:
        if not self.keys:
            return float("inf"), -1
        d = torch.cdist(query[None], torch.stack(self.keys))[0]  # (n,)
        return d.min().item(), int(d.argmin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        if self.forced is not None:  # training one entry's value: replace from the last prompt token on
            start, value = self.forced
            return torch.cat([out[:, :start], value.expand(x.shape[0], x.shape[1] - start, -1)], dim=1)
        if self.decide:
            queries = x[torch.arange(x.shape[0]), self.positions]  # (B, in)
            self.hits = [self.lookup(q) for q in queries]
            self.decide = False
        if not any(hit is not None for hit in self.hits):
            return out
        replaced = out.clone()
        for row, entry in enumerate(self.hits):
            if entry is not None:
                start = int(self.positions[row]) if x.shape[1] > 1 else 0  # decode steps: the new token
                replaced[row, start:] = self.values[entry]
        return replaced

    def lookup(self, query: torch.Tensor) -> int | None:
        d, i = self.nearest(query)
        return i if i >= 0 and d <= self.radii[i] else None


class Grace(Served):
    def __init__(self, model, tokenizer, layer: str, eps_init: float = 1.0, train: TrainConfig | None = None):
        super().__init__(model, tokenizer)
        parent, child = parent_of(model, layer)
        self.layer = GraceLayer(getattr(parent, child))
        setattr(parent, child, self.layer)
        self.passes = PromptPasses(model, self._on_prompt)  # the codebook decides on each prompt pass
        self.eps_init = eps_init
        self.train = train or TrainConfig(lr=1.0, max_steps=100)  # the paper's value optimizer: Adam, lr 1.0
        self.trainable = self.layer.base_layer.weight.shape[0]  # one value vector per edit (out features)

    def _on_prompt(self, prompt: Prompt) -> None:
        self.layer.positions = prompt.last_positions()
        self.layer.decide = True

    @torch.no_grad()
    def _key_and_output(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        captured = {}
        hook = self.layer.base_layer.register_forward_hook(
            lambda m, inp, out: captured.update(key=inp[0][0, -1].clone(), out=out[0, -1].clone()))
        self.model(**self.tokenize_batch([prompt]))
        hook.remove()
        return captured["key"], captured["out"]

    def edit(self, prompt: str, target: str, form: str = "completion") -> int:  # every form trained alike
        key, output = self._key_and_output(prompt)
        d, i = self.layer.nearest(key)
        if i >= 0 and d <= self.eps_init + self.layer.radii[i]:
            if self.layer.labels[i] == target:  # same answer: widen the nearest entry to cover this key
                self.layer.radii[i] = max(self.layer.radii[i], d)
                return i + 1
            self.layer.radii[i] = d / 2  # conflicting answers: split the space between the two entries
            radius = d / 2
        else:
            radius = self.eps_init
        value = nn.Parameter(output)  # initialised to the layer's own output there, as in the paper's code
        ids, n = self.sequence(prompt, target)
        self.layer.forced = (ids.shape[1] - n - 1, value)
        try:
            fit(self.model, [[(ids, n)]], [value], self.train)
        finally:
            self.layer.forced = None
        self.layer.keys.append(key)
        self.layer.values.append(value.detach())
        self.layer.radii.append(radius)
        self.layer.labels.append(target)
        return len(self.layer.keys)

    def rollback(self, entry: int) -> None:
        """Delete the entry's radius: the key never matches again, so the layer defers to the base model."""
        self.layer.radii[entry - 1] = -1.0
