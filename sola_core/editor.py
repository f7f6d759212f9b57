"""SolaEditor, the public Python API: patches a model in place and edits it through a registry.

The editor wires: it injects (finds each edited linear with `get_submodule`, swaps in a `SolaLayer` with
`setattr`, and puts the original back on `close`); the layer computes; the router decides which edit each row
gets; the registry stores and searches.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from registry import AdapterCache, EditRegistry, Record
from registry.errors import ValidationError

from .chat import chat_prompt, chat_reply
from .config import ASK_FRAME, QA_FRAME, EditConfig, RuntimeConfig, TrainConfig
from .edits import check_edit, normal_edit
from .fingerprint import check_model, registry_config
from .generation import context_length, greedy, next_token_logits, tokenize_batch
from .keys import KeySource, key_source
from .layer import SolaLayer
from .models import block_of, parent_of
from .routing import Router
from .train import train_adapters

WINDOW = 32  # edit_many trains this many batches' edits in one go (keys, token ids), the batch kept full throughout


class SolaEditor:
    """One model, patched in place, serving and editing one registry."""

    def __init__(self, registry: EditRegistry, model: nn.Module, tokenizer, runtime: RuntimeConfig,
                 keys: KeySource) -> None:
        self.registry, self.model, self.tokenizer = registry, model, tokenizer
        cfg = registry.config
        self.device = torch.device(runtime.device or next(model.parameters()).device)
        self.cache = AdapterCache(cfg.layers, cfg.rank, runtime.cache_slots, loader=registry.adapters,
                                  device=self.device, dtype=next(model.parameters()).dtype)
        for spec in cfg.layers:
            if isinstance(getattr(*parent_of(model, spec.name)), SolaLayer):
                raise ValidationError(f"{spec.name} is already patched by another SolaEditor; close that one first")
        ends = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []  # what training appends
        self.router = Router(model, registry, keys, self.cache, self.device, ends)
        self._inject()

    @classmethod
    def open(cls, path: str | Path, model: nn.Module, tokenizer, config: EditConfig | None = None,
             runtime: RuntimeConfig | None = None, readonly: bool = False) -> "SolaEditor":
        """Open the registry at `path` for `model` (creating it with `config` if absent) and patch the model."""
        runtime = runtime or RuntimeConfig()
        device = runtime.device or str(next(model.parameters()).device)
        if EditRegistry.exists(path):
            registry = EditRegistry.open(path, readonly=readonly, backend=runtime.backend, device=device,
                                         key_dtype=runtime.key_dtype)
            keys = None
        else:
            config = config or EditConfig()
            keys = key_source(config.key_source, tokenizer, runtime.encoder_dtype)  # built once: the encoder source loads a model
            registry = EditRegistry.create(path, registry_config(model, config, keys),
                                           backend=runtime.backend, device=device, key_dtype=runtime.key_dtype)
        try:
            if keys is None:
                check_model(registry, model)
                keys = key_source(registry.config.key_source, tokenizer, runtime.encoder_dtype)
            return cls(registry, model, tokenizer, runtime, keys)
        except BaseException:
            registry.close()
            raise

    # -- injection -------------------------------------------------------------------------------
    def _inject(self) -> None:
        for i, spec in enumerate(self.registry.config.layers):
            parent, child = parent_of(self.model, spec.name)
            route = self.router.decide if i == 0 else None  # layers are in forward order: the first one decides
            setattr(parent, child, SolaLayer(getattr(parent, child), i, self.router.state, route))

    def unwrap(self) -> nn.Module:
        """Put the original linears back; the model is then exactly the object it was before `open`."""
        for spec in self.registry.config.layers:
            parent, child = parent_of(self.model, spec.name)
            layer = getattr(parent, child)
            if isinstance(layer, SolaLayer):
                setattr(parent, child, layer.base_layer)
        self.router.remove()
        return self.model

    # -- public API ------------------------------------------------------------------------------
    def tokenize_batch(self, prompts: list[str]) -> dict:
        """The left-padded batch (input_ids, attention_mask) that keys, routing and generation all take."""
        return tokenize_batch(self.model, self.tokenizer, prompts, self.device)

    def edit(self, prompt: str, target: str, train: TrainConfig | None = None, *, form: str = "completion",
             paraphrases: Sequence[str] = (), subject: str | None = None) -> int:
        """Teach the model `prompt` -> `target` with a new frozen adapter; returns the new edit id.

        `form` says how the prompt is asked (FORMS): "completion", a sentence `target` continues as given (mind
        its leading space: "The capital of Peru is" -> " Quito"); "question", a question `target` answers
        ("What is the capital of Peru?" -> "Quito"); "chat", a user message `target` is the assistant's reply to,
        served through the model's chat template. `paraphrases` are other phrasings of the same fact: each
        becomes a routing key of this edit and a training example of its adapter. `subject` is what the fact is
        about, in the prompt's words ("the telephone" in "The telephone was invented by"): a query that says it
        routes to the edit from farther away (within NAMED_RADIUS), as one naming the prompt's proper nouns does,
        when it also asks what the edit asks (not another fact about the same subject).
        """
        edit = {"prompt": prompt, "target": target, "form": form, "paraphrases": paraphrases, "subject": subject}
        return self.edit_many([edit], train)[0]

    def edit_many(self, edits: Iterable[dict], train: TrainConfig | None = None, *, batch_size: int = 16,
                  progress: Callable[[int], None] | None = None) -> list[int]:
        """Make many edits (dicts of `edit`'s keyword arguments: prompt, target, optional form, paraphrases and
        subject), `batch_size` of them training at once; returns their ids, in order.

        Every edit is checked before the first is trained. Each adapter comes out as `edit` would train it alone
        (its own rows, loss, optimizer state and stopping rule); a finished edit's place in the batch goes to the
        next one. The edits are stored in order, `batch_size` per write transaction, so a later edit of the same
        fact supersedes an earlier one exactly as one-by-one edits would, and an interrupted call keeps every
        transaction stored before it. `progress(n)` is called as n more edits are stored.
        """
        if batch_size < 1:
            raise ValidationError(f"batch_size must be at least 1, got {batch_size}")
        edits = [normal_edit(e) for e in edits]
        for e in edits:
            check_edit(self.model, self.tokenizer, e)
        train = train or TrainConfig()
        ids: list[int] = []
        window = WINDOW * batch_size
        for start in range(0, len(edits), window):
            ids += self._edit_window(edits[start:start + window], train, batch_size, progress)
        return ids

    def _edit_window(self, edits: list[dict], train: TrainConfig, batch_size: int,
                     progress: Callable[[int], None] | None) -> list[int]:
        """`edits` (normal_edit's) trained `batch_size` at a time, a finished edit's place taken by the next, and
        stored in order, `batch_size` per transaction, as soon as all of a transaction's edits are trained."""
        per_edit = []  # each edit's keys: (phrasings, key_dim), each phrasing's whole-text query
        for i in range(0, len(edits), batch_size):
            part = edits[i:i + batch_size]
            served = self.tokenize_batch([self._served(text, e["form"]) for e in part for text in e["phrasings"]])
            keys = self.router.queries(served)[0][:, 0].cpu().numpy()
            per_edit += np.split(keys, np.cumsum([len(e["phrasings"]) for e in part])[:-1])
        cfg = self.registry.config
        shapes = [(spec.in_features, spec.out_features) for spec in cfg.layers]
        groups = [[ex for text in e["phrasings"] for ex in self._examples(text, e["target"], e["form"], train)]
                  for e in edits]
        trained: dict[int, dict] = {}
        ids: list[int] = []

        def store(g: int, adapter: dict, info: dict) -> None:
            e = edits[g]
            trained[g] = {"prompt": e["prompt"], "target": e["target"], "keys": per_edit[g], "adapter": adapter,
                          "info": {**info, "form": e["form"], "batch": min(batch_size, len(edits))},
                          "paraphrases": e["phrasings"][1:], "subject": e["subject"]}
            while len(ids) < len(edits):  # the next transaction's edits, once all of them are trained
                group = range(len(ids), min(len(ids) + batch_size, len(edits)))
                if any(i not in trained for i in group):
                    break
                ids.extend(self.registry.add_many([trained.pop(i) for i in group], batch_size=len(group)))
                if progress is not None:
                    progress(len(group))

        train_adapters(self.model, self.router.state, shapes, groups, cfg.rank, cfg.alpha, train,
                       block_of(self.model, cfg.layers[0].name), slots=batch_size, done=store)
        return ids

    def _served(self, text: str, form: str) -> str:
        """The text the model sees when `text` is asked in `form`."""
        return chat_prompt(self.tokenizer, text) if form == "chat" else text

    def _examples(self, text: str, target: str, form: str, train: TrainConfig) -> list[tuple[torch.Tensor, int]]:
        """What one phrasing of an edit trains its adapter on: the text then the target (and the end-of-sequence
        token), and the same fact as a chat exchange in the model's template (the reply ends with its end-of-turn
        marker). A chat edit always trains its chat form, the others with `train.chat_form`; a chat edit trains
        its bare form only with `train.chat_form` too. With `train.qa_form` a question (a question edit, or a
        phrasing ending in "?") also trains framed as QA_FRAME: after a QA instruction SmolLM2 tends to end its
        reply at once, which an adapter trained on the bare and chat forms alone did not overcome. With
        `train.question_form` a completion phrasing also trains asked as a question (ASK_FRAME), for the same
        reason: after a bare question SmolLM2 ends its reply at once. The primary form comes first and is always
        kept."""
        tok, limit = self.tokenizer, context_length(self.model)
        answer = target.strip()
        target_ids = tok(target if form == "completion" else " " + answer, add_special_tokens=False)["input_ids"]
        end = [tok.eos_token_id] if train.end_token and tok.eos_token_id is not None else []
        text_ids = tok(text)["input_ids"]
        if limit and len(text_ids) + len(target_ids) + len(end) > limit:
            end = []  # the edit fills the context exactly: nothing can follow it anyway
        bare = (text_ids, target_ids + end)
        chat = None
        if getattr(tok, "chat_template", None) and (form == "chat" or train.chat_form):
            reply = chat_reply(tok, text, answer)
            if reply is not None:
                chat = (tok(chat_prompt(tok, text))["input_ids"], tok(reply, add_special_tokens=False)["input_ids"])
        spaced = tok(" " + answer, add_special_tokens=False)["input_ids"] + end  # the answer after a question
        asks = text.rstrip().endswith("?")
        qa = (tok(QA_FRAME.format(text))["input_ids"], spaced) \
            if train.qa_form and form != "chat" and (form == "question" or asks) else None
        asked = (tok(ASK_FRAME.format(text.rstrip()))["input_ids"], spaced) \
            if train.question_form and form == "completion" and not asks else None
        forms = [chat, bare if train.chat_form else None] if form == "chat" else [bare, chat, qa, asked]
        examples = []
        for pair in filter(None, forms):
            ids = torch.tensor([pair[0] + pair[1]], device=self.device)
            if not examples or not limit or ids.shape[1] <= limit:  # a secondary form beyond the context: left out
                examples.append((ids, len(pair[1])))
        return examples

    def key(self, prompt: str) -> torch.Tensor:
        """The routing key `prompt` gets (the same vector it is queried with when served)."""
        queries, _ = self.router.queries(self.tokenize_batch([prompt]))
        return queries[0, 0]

    def route(self, prompts: list[str]) -> list[int | None]:
        """The edit that fires for each prompt, or None. With the encoder key no language model runs; with the
        layer key the model runs only up to the first edited layer."""
        return self.router.route(self.tokenize_batch(prompts))

    def logits(self, prompts: list[str]) -> torch.Tensor:
        """(B, vocab) next-token logits after each prompt, as served (routed edits applied)."""
        return next_token_logits(self.model, self.tokenize_batch(prompts))

    def generate(self, prompts: list[str], max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Greedy continuations (`kwargs` go to `generation.greedy`, `until` included, then `model.generate`); each
        sequence keeps the edit its prompt was routed to for every new token, and `routed()` then says which edit
        that was."""
        return greedy(self.model, self.tokenizer, self.tokenize_batch(prompts), max_new_tokens, **kwargs)

    def routed(self) -> list[int | None]:
        """The edit each row of the last served batch (`generate`, `logits`, or any forward of the model) was
        routed to; None where the base model served it."""
        return self.router.routed()

    def rollback(self, edit_id: int) -> Record:
        """Take an edit out of routing; its prompt then behaves exactly as before it (or as its previous version)."""
        return self.registry.rollback(edit_id)

    def restore(self, edit_id: int) -> Record:
        """Bring a rolled-back edit back into routing."""
        return self.registry.restore(edit_id)

    def edits(self, status: str | None = None) -> list[Record]:
        return list(self.registry.records(status))

    def close(self) -> None:
        """Unpatch the model and close the registry."""
        self.unwrap()
        self.registry.close()

    def __enter__(self) -> "SolaEditor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
