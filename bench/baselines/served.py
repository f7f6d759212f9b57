"""What every baseline shares: greedy generation and next-token logits of a patched model."""
from __future__ import annotations

import torch

from sola_core.generation import greedy, next_token_logits, tokenize_batch


class Served:
    """A model patched by a baseline, tokenized and decoded exactly like SolaEditor's."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device

    def tokenize_batch(self, prompts: list[str]) -> dict:
        return tokenize_batch(self.model, self.tokenizer, prompts, self.device)

    def generate(self, prompts: list[str], max_new_tokens: int, until=None) -> list[str]:
        return greedy(self.model, self.tokenizer, self.tokenize_batch(prompts), max_new_tokens, until)

    def logits(self, prompts: list[str]) -> torch.Tensor:
        return next_token_logits(self.model, self.tokenize_batch(prompts))

    def sequence(self, prompt: str, target: str) -> tuple[torch.Tensor, int]:
        """(1, P + n) prompt-then-target ids, and n."""
        target_ids = self.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([self.tokenize_batch([prompt])["input_ids"], target_ids.to(self.device)], 1), target_ids.shape[1]
