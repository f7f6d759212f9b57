"""Batches in and text out: how prompts are tokenized, fed and decoded, the same for editing, serving and benchmarks."""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from registry.errors import ValidationError


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def tokenize_batch(model: nn.Module, tokenizer, prompts: list[str], device) -> dict:
    """A left-padded batch (token ids and attention mask only: some tokenizers add token_type_ids, which decoder
    LMs refuse), refused when longer than the model's context."""
    enc = tokenizer([prompts] if isinstance(prompts, str) else list(prompts), return_tensors="pt", padding=True)
    limit = context_length(model)
    if limit and enc["input_ids"].shape[1] > limit:
        raise ValidationError(f"prompt is {enc['input_ids'].shape[1]} tokens; the model's context is {limit}")
    return {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}


def with_positions(model: nn.Module, enc: dict) -> dict:
    """Position ids that skip left padding, as `generate` computes them, so a padded row's states (and key)
    match the same prompt alone; a plain forward would otherwise count the pads. Models that take no position
    ids (ALiBi: BLOOM, MPT) get the batch as it is."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return enc
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return {**enc, "position_ids": positions}


@torch.no_grad()
def next_token_logits(model: nn.Module, enc: dict) -> torch.Tensor:
    """(B, vocab) logits after each row's last token."""
    return model(**with_positions(model, enc)).logits[:, -1]


class Until(StoppingCriteria):
    """Ends each row of a `generate` once `done(its new text so far)` holds (rows end one by one)."""

    def __init__(self, tokenizer, start: int, done: Callable[[str], bool]) -> None:
        self.tokenizer, self.start, self.done = tokenizer, start, done

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([self.done(text) for text in texts], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, enc: dict, max_new_tokens: int,
           until: Callable[[str], bool] | None = None, **kwargs) -> list[str]:
    """Greedy continuations (the new text only); with `until`, each row ends as soon as `until(its text)` holds."""
    limit = context_length(model)
    start = enc["input_ids"].shape[1]
    if limit and start + max_new_tokens > limit:
        raise ValidationError(f"prompt ({start} tokens) plus {max_new_tokens} new tokens "
                              f"exceed the model's context of {limit}")
    kwargs.setdefault("do_sample", False)
    if until is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([Until(tokenizer, start, until)])
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
