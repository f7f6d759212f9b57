"""Training one edit's adapter against the frozen base model, with only that adapter active."""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

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


def fit(model: nn.Module, input_ids: torch.Tensor, n_target: int, params: list[torch.Tensor],
        cfg: TrainConfig) -> dict:
    """Adam on `params` until `input_ids` (1, T) — prompt then n_target target tokens — is predicted.

    Teacher-forced argmax equal to the target at every target position means greedy generation produces
    exactly the target, so training stops as soon as that holds with `cfg.margin` to spare.
    """
    opt = torch.optim.Adam(params, lr=cfg.lr)
    targets = input_ids[0, -n_target:]  # (n,)
    start, steps = time.perf_counter(), 0
    while True:
        logits = model(input_ids=input_ids).logits[0, -n_target - 1:-1].float()  # (n, vocab)
        margin = target_margin(logits.detach(), targets)
        loss = F.cross_entropy(logits, targets)
        if margin >= cfg.margin or steps >= cfg.max_steps:
            break
        opt.zero_grad()
        loss.backward(inputs=params)  # gradients for the trained tensors only; base weights get no .grad
        opt.step()
        steps += 1
    return {"steps": steps, "loss": loss.item(), "margin": margin, "converged": margin > 0,
            "seconds": round(time.perf_counter() - start, 4)}


def train_adapter(model: nn.Module, state: RoutingState, shapes: list[tuple[int, int]], input_ids: torch.Tensor,
                  n_target: int, rank: int, alpha: float, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """A fresh adapter, forced on while it trains (only it: earlier edits are not routed), then frozen."""
    params = new_adapter(shapes, rank, cfg.seed, input_ids.device)
    with state.forcing(params, alpha / rank):
        info = fit(model, input_ids, n_target, [p for pair in params for p in pair], cfg)
    adapter = {}
    for i, (A, B) in enumerate(params):
        adapter[f"{i}.A"] = A.detach().float().cpu().contiguous()
        adapter[f"{i}.B"] = B.detach().float().cpu().contiguous()
    return adapter, info
