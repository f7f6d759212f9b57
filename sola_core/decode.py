"""Decoding a batch in which every row has its own sampling, stop strings and length, streamed as text arrives.

Plain `model.generate` gives one setting to the whole batch and streams one row at most. The server still decodes
with `generate` (its caches, positions and routing are what every release gives, and the router keeps each row's
edit for all of its tokens, routing.PromptPasses), through its two stable hooks: a logits processor that picks
each row's token by that row's settings, and a stopping criterion that reads each row's new token every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens. temperature 0 is greedy (argmax, as `SolaEditor.generate`); `ignore_eos`
    never picks an end token, so the reply runs to max_tokens or a stop string (benchmarks: equal lengths)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Event:
    """What a row did in one step: `text` is new reply text (possibly ""); `finish` is set on its last event
    ("stop": end-of-sequence or a stop string; "length": max_tokens reached)."""

    row: int
    text: str = ""
    finish: str | None = None
    tokens: int = 0  # completion tokens so far


@dataclass
class ReplyText:
    """A row's reply as text: what is safe to send now, holding back a possible start of a stop string and an
    incomplete multi-byte character."""

    tokenizer: object
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string ended the reply)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text[:min(hits)]), True
        safe = len(text.rstrip("\ufffd"))  # a character split across tokens decodes as U+FFFD until complete
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._take(text[:max(safe, self.sent)]), False

    def flush(self) -> str:
        """The rest of the text once the reply ends for another reason."""
        return self._take(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _take(self, upto: str) -> str:
        new, self.sent = upto[self.sent:], max(self.sent, len(upto))
        return new


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from (vocab,) logits: argmax at temperature 0, else nucleus sampling."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= sampling.top_p  # the smallest set reaching top_p stays
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
    return int(torch.multinomial(probs, 1, generator=generator))


class RowSampler(LogitsProcessor):
    """Picks each row's token by its own Sampling, and leaves `generate` (greedy) nothing else to choose."""

    def __init__(self, sampling: list[Sampling], generators: list[torch.Generator | None], end_tokens: set[int]) -> None:
        self.sampling, self.generators = sampling, generators
        self.no_end = [i for i, s in enumerate(sampling) if s.ignore_eos]
        self.end_tokens = sorted(end_tokens)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.no_end and self.end_tokens:
            scores[torch.tensor(self.no_end)[:, None], torch.tensor(self.end_tokens)[None, :]] = float("-inf")
        chosen = scores.argmax(-1)  # (B,): what greedy rows take, exactly as `generate` would
        for i, s in enumerate(self.sampling):
            if s.temperature > 0:
                chosen[i] = pick(scores[i], s, self.generators[i])
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen[:, None], 0.0)


class RowStops(StoppingCriteria):
    """Reads each row's new token after every step: turns it into text, emits it, and ends the row at an end
    token, a stop string, its max_tokens or its cancellation. `generate` calls this once per step in every
    release (its streamer hook moved between releases, so it is not used)."""

    def __init__(self, tokenizer, sampling: list[Sampling], end_tokens: set[int], emit: Callable[[Event], None],
                 on_prompt_pass: Callable[[], None], cancelled: Callable[[int], bool]) -> None:
        self.sampling, self.end_tokens, self.emit = sampling, end_tokens, emit
        self.on_prompt_pass, self.cancelled = on_prompt_pass, cancelled
        self.replies = [ReplyText(tokenizer, s.stop) for s in sampling]
        self.done = [False] * len(sampling)
        self.first = True

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.first:
            self.first = False
            self.on_prompt_pass()
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[i]:
                self.step(i, token)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def step(self, i: int, token: int) -> None:
        reply = self.replies[i]
        if self.cancelled(i):
            self.done[i] = True
        elif token in self.end_tokens:
            self.done[i] = True
            self.emit(Event(i, reply.flush(), "stop", len(reply.tokens) + 1))
        else:
            text, stopped = reply.add(token)
            full = len(reply.tokens) >= self.sampling[i].max_tokens
            self.done[i] = stopped or full
            why = "stop" if stopped else "length" if full else None
            self.emit(Event(i, text + reply.flush() if why == "length" else text, why, len(reply.tokens)))


@torch.no_grad()
def decode(model: nn.Module, tokenizer, prompts: list[list[int]], sampling: list[Sampling], end_tokens: set[int],
           emit: Callable[[Event], None], on_prompt_pass: Callable[[], None] = lambda: None,
           cancelled: Callable[[int], bool] = lambda row: False) -> None:
    """Decode `prompts` (token ids) together, each row by its own `sampling`, emitting Events as text arrives.

    `on_prompt_pass()` runs right after the prompt pass (the router has decided every row's edit by then). A row
    for which `cancelled(row)` turns true ends without another event (its client went away)."""
    device = next(model.parameters()).device
    rows, width = len(prompts), max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    generators = [None if s.seed is None or s.temperature == 0 else torch.Generator().manual_seed(s.seed)
                  for s in sampling]
    stops = RowStops(tokenizer, sampling, end_tokens, emit, on_prompt_pass, cancelled)
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                   max_new_tokens=max(s.max_tokens for s in sampling), pad_token_id=pad,
                   eos_token_id=sorted(end_tokens) or None,
                   logits_processor=LogitsProcessorList([RowSampler(sampling, generators, end_tokens)]),
                   stopping_criteria=StoppingCriteriaList([stops]))
