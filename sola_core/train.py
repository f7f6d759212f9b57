"""Training one edit's adapter against the frozen base model, with only that adapter active."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from registry.types import adapter_names

from .config import TrainConfig
from .routing import RoutingState


def new_adapter(shapes: list[tuple[int, int]], rank: int, seed: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hu et al.'s LoRA init: A random, B zero, so the untrained adapter changes nothing."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for in_f, out_f in shapes:
        bound = 1.0 / math.sqrt(in_f)
        A = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound  # (r, in)
        B = torch.zeros(out_f, rank)  # (out, r)
        params.append((nn.Parameter(A.to(device)), nn.Parameter(B.to(device))))
    return params


def target_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Smallest lead of a target token's logit over the best other token (> 0: greedy decoding yields the target)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    others = logits.scatter(1, targets[:, None], float("-inf")).max(dim=1).values  # (n,)
    return (picked - others).min().item()


Example = tuple[torch.Tensor, int]  # (1, T) token ids, prompt then target; how many of them are the target


class _Replay(nn.Module):
    """Stands in for a block whose input is the same at every training step: returns what it returned once."""

    def __init__(self, block: nn.Module, output) -> None:
        super().__init__()
        self.block, self.output = block, output

    def forward(self, *args, **kwargs):
        return self.output

    def __getattr__(self, name: str):  # models read attributes of their blocks (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.block, name)


@contextmanager
def replaying(model: nn.Module, blocks: nn.ModuleList, below: int, inputs: dict) -> Iterator[None]:
    """Nothing below the first edited layer changes while its adapter trains, so blocks[:below] run once on
    `inputs` and then replay their outputs: each step computes only the blocks from the edited one up (on SmolLM2,
    6 of 30). Exact: a replayed block returns the very output it computed."""
    outputs: dict[int, object] = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i in range(below)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    originals = [blocks[i] for i in range(below)]
    for i in range(below):
        blocks[i] = _Replay(originals[i], outputs[i])
    try:
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block


@contextmanager
def targets_only(model: nn.Module, rows: torch.Tensor, positions: torch.Tensor) -> Iterator[None]:
    """The output head sees only the hidden states that predict a target token: (N, vocab) logits instead of
    (batch, length, vocab). On SmolLM2 (49k-token vocabulary) the head was a third of each training step."""
    head = model.get_output_embeddings()
    hook = None if head is None else head.register_forward_pre_hook(lambda m, args: (args[0][rows, positions],
                                                                                     *args[1:]))
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()


def fit(model: nn.Module, examples: list[Example], params: list[torch.Tensor], cfg: TrainConfig,
        frozen: tuple[nn.ModuleList, int] | None = None) -> dict:
    """Adam on `params` until every example's target is predicted after its prompt (one batch, right-padded,
    so each row keeps its own positions). With `frozen` = (blocks, i), blocks[:i] are replayed (`replaying`).

    Teacher-forced argmax equal to the target at every target position means greedy generation produces
    exactly the target, so training stops as soon as that holds for every example with `cfg.margin` to spare.
    """
    lengths = [ids.shape[1] for ids, _ in examples]
    batch = torch.zeros(len(examples), max(lengths), dtype=torch.long, device=examples[0][0].device)
    mask = torch.zeros_like(batch)
    rows, positions = [], []
    for i, ((ids, n), length) in enumerate(zip(examples, lengths)):
        batch[i, :length], mask[i, :length] = ids[0], 1
        rows += [i] * n
        positions += range(length - n - 1, length - 1)  # each target token is predicted one position earlier
    rows, positions = torch.tensor(rows, device=batch.device), torch.tensor(positions, device=batch.device)
    targets = batch[rows, positions + 1]  # (N,)
    inputs = {"input_ids": batch, "attention_mask": mask, "use_cache": False}
    start = time.perf_counter()
    with replaying(model, *frozen, inputs) if frozen and frozen[1] > 0 else nullcontext(), \
            targets_only(model, rows, positions):
        info = _descend(model, inputs, rows, positions, targets, params, cfg)
    return {**info, "examples": len(examples), "seconds": round(time.perf_counter() - start, 4)}


def _descend(model, inputs, rows, positions, targets, params, cfg) -> dict:
    opt = torch.optim.Adam(params, lr=cfg.lr)
    steps = 0
    while True:
        logits = model(**inputs).logits  # (N, vocab) where targets_only took hold, else (batch, length, vocab)
        logits = (logits if logits.dim() == 2 else logits[rows, positions]).float()
        margin = target_margin(logits.detach(), targets)
        loss = F.cross_entropy(logits, targets)
        if margin >= cfg.margin or steps >= cfg.max_steps:
            break
        opt.zero_grad()
        loss.backward(inputs=params)  # gradients for the trained tensors only; base weights get no .grad
        opt.step()
        steps += 1
    return {"steps": steps, "loss": loss.item(), "margin": margin, "converged": margin > 0,
            "stopped_short": margin < cfg.margin}


def train_adapter(model: nn.Module, state: RoutingState, shapes: list[tuple[int, int]], examples: list[Example],
                  rank: int, alpha: float, cfg: TrainConfig,
                  frozen: tuple[nn.ModuleList, int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A fresh adapter, forced on while it trains (only it: earlier edits are not routed), then frozen."""
    params = new_adapter(shapes, rank, cfg.seed, examples[0][0].device)
    with state.forcing(params, alpha / rank):
        info = fit(model, examples, [p for pair in params for p in pair], cfg, frozen)
    adapter = {}
    for i, (A, B) in enumerate(params):
        a, b = adapter_names(i)
        adapter[a], adapter[b] = A.detach().float().cpu().contiguous(), B.detach().float().cpu().contiguous()
    return adapter, info
