"""The edited layer: the base linear's output plus, for rows routed to an edit, that edit's LoRA delta.

Computing only. Where the layer sits is the editor's business (editor.py); which edit a row gets is
decided once per sequence by the router (routing.py) and shared by every edited layer through `RoutingState`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .routing import RoutingState


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or GPT-2's Conv1D (whose weight is stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.nf
    raise TypeError(f"can only edit nn.Linear or transformers Conv1D, not {type(module).__name__}")


def row_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B_m A_m x_m for each row m: x (m, T, in), A (m, r, in), B (m, out, r) -> (m, T, out)."""
    return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))


class SolaLayer(nn.Module):
    """Wraps a frozen linear; adds `scaling * B_i A_i x` for the rows routed to edit i, nothing for the rest.

    LoRA never merges into the weight, so Conv1D's transposed storage needs no special case:
    A is (r, in) and B is (out, r) for both kinds.
    """

    def __init__(self, base_layer: nn.Module, layer_number: int, state: RoutingState,
                 route: Callable[[torch.Tensor], None] | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear_shape(base_layer)
        self.base_layer = base_layer
        self.layer_number = layer_number  # which of the registry's edited layers (0 = first): picks its A, B
        self.state = state
        self.route = route  # only the first edited layer routes (Router.decide); the others reuse its decision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (B, T, out)
        s = self.state
        rows = s.forced_rows if s.forced is not None else s.positions
        if x.dim() == 2 and rows is not None:  # OPT flattens (B, T, in) to (B * T, in) around its MLP
            x3, out3 = x.view(rows.shape[0], -1, x.shape[-1]), out.view(rows.shape[0], -1, out.shape[-1])
            return (self._trained(x3, out3) if s.forced is not None else self._routed(x3, out3)).flatten(0, 1)
        return self._trained(x, out) if s.forced is not None else self._routed(x, out)

    def _trained(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Training: each row's own adapter, from the stacked ones being trained (gradients reach only them)."""
        s = self.state
        A, B = s.forced[self.layer_number]  # (G, r, in), (G, out, r)
        return out + s.scaling * row_delta(x, A[s.forced_rows].to(x.dtype), B[s.forced_rows].to(x.dtype))

    def _routed(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        s = self.state
        if self.route is not None and s.decide:
            self.route(x)
        if s.rows is None or s.rows.numel() == 0:
            return out  # no edit matched: exactly the base output
        if x.shape[0] != s.edit_ids.shape[0]:
            raise RuntimeError(f"routing was decided for a batch of {s.edit_ids.shape[0]} rows, got {x.shape[0]}")
        A, B = s.adapters(self.layer_number)  # (S, r, in), (S, out, r)
        delta = row_delta(x[s.rows], A[s.slots], B[s.slots])  # (m, T, out)
        return out.index_add(0, s.rows, delta, alpha=s.scaling)  # other rows untouched, bit for bit
