"""Batches in and text out: how prompts are tokenized, fed and decoded, the same for editing, serving and benchmarks."""
from __future__ import annotations

import inspect

import torch
from torch import nn

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


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, enc: dict, max_new_tokens: int, **kwargs) -> list[str]:
    """Greedy continuations (the new text only)."""
    limit = context_length(model)
    if limit and enc["input_ids"].shape[1] + max_new_tokens > limit:
        raise ValidationError(f"prompt ({enc['input_ids'].shape[1]} tokens) plus {max_new_tokens} new tokens "
                              f"exceed the model's context of {limit}")
    kwargs.setdefault("do_sample", False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
