"""Where routing keys and queries come from.

A key source turns one forward pass into one vector per row. The same source makes the key when an edit is
stored and the query when an input is served, so an input routes to an edit when the two vectors are close.
"""
from __future__ import annotations

from typing import Protocol

import torch


class KeySource(Protocol):
    name: str  # persisted in the registry: a registry is served with the key source it was built with

    def dim(self, first_layer_in: int) -> int:
        """Length of the key vector, given the first edited layer's input width."""

    def before_forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Called on a sequence's prompt pass before the model runs; may return the (B, d) queries up front."""

    def query(self, x: torch.Tensor, positions: torch.Tensor, precomputed: torch.Tensor | None) -> torch.Tensor:
        """(B, d) queries, from the first edited layer's input x (B, T, in) at each row's last prompt token."""


class LayerKey:
    """The paper's key: the first edited layer's input at the last prompt token."""

    name = "layer"

    def dim(self, first_layer_in: int) -> int:
        return first_layer_in

    def before_forward(self, input_ids, attention_mask):
        return None

    def query(self, x, positions, precomputed):
        return x[torch.arange(x.shape[0], device=x.device), positions]  # (B, in)


KEY_SOURCES: dict[str, type] = {LayerKey.name: LayerKey}


def key_source(name: str) -> KeySource:
    if name not in KEY_SOURCES:
        raise ValueError(f"unknown key source {name!r}; known: {', '.join(KEY_SOURCES)}")
    return KEY_SOURCES[name]()
