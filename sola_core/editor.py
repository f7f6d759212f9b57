"""SolaEditor, the public Python API: patches a model in place and edits it through a registry.

The editor injects (finds each edited linear with `get_submodule`, swaps in a `SolaLayer` with `setattr`,
and puts the original back on `close`); the layer computes; the registry stores and searches.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from registry import AdapterCache, EditRegistry, LayerSpec, Record, RegistryConfig
from registry.errors import ConfigMismatch, CorruptEdit, ValidationError

from .config import EditConfig, RuntimeConfig, TrainConfig
from .fingerprint import fingerprint, mismatch
from .keys import KeySource, key_source
from .layer import RoutingState, SolaLayer, linear_shape
from .models import default_layers
from .train import train_adapter

log = logging.getLogger(__name__)


class _Routed(Exception):
    """Raised by the router to end a forward pass early when only the routing decision or key is wanted."""


def cached_length(past) -> int:
    """Tokens already in a KV cache (0 on a sequence's prompt pass)."""
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0


def last_positions(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Index of each row's last real token; works for left and right padding alike."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    steps = torch.arange(length, device=attention_mask.device)  # (T,)
    return (attention_mask.bool() * steps).argmax(dim=1).to(device)  # (B,)


def with_positions(enc: dict) -> dict:
    """Position ids that skip left padding, as `generate` computes them, so a padded row's states (and key)
    match the same prompt alone; a plain forward would otherwise count the pads."""
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # (B, T)
    return {**enc, "position_ids": positions}


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


def encode(model: nn.Module, tokenizer, prompts: list[str], device) -> dict:
    """A left-padded batch, refused when longer than the model's context."""
    enc = tokenizer([prompts] if isinstance(prompts, str) else list(prompts), return_tensors="pt", padding=True)
    limit = context_length(model)
    if limit and enc["input_ids"].shape[1] > limit:
        raise ValidationError(f"prompt is {enc['input_ids'].shape[1]} tokens; the model's context is {limit}")
    return {k: v.to(device) for k, v in enc.items()}


@torch.no_grad()
def next_token_logits(model: nn.Module, enc: dict) -> torch.Tensor:
    """(B, vocab) logits after each row's last token."""
    return model(**with_positions(enc)).logits[:, -1]


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


class SolaEditor:
    """One model, patched in place, serving and editing one registry."""

    def __init__(self, registry: EditRegistry, model: nn.Module, tokenizer, runtime: RuntimeConfig,
                 keys: KeySource) -> None:
        self.registry, self.model, self.tokenizer = registry, model, tokenizer
        cfg = registry.config
        self.keys = keys
        self.device = torch.device(runtime.device or next(model.parameters()).device)
        self.cache = AdapterCache(cfg.layers, cfg.rank, runtime.cache_slots, loader=registry.adapters,
                                  device=self.device, dtype=next(model.parameters()).dtype)
        self.state = RoutingState(adapters=self.cache.tensors, scaling=cfg.alpha / cfg.rank)
        self._stop: str | None = None  # "key" or "route": end the forward at the first edited layer
        self._captured: torch.Tensor | None = None
        registry.on_change(self._on_change)
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
            names = [spec.name for spec in registry.config.layers]
            try:
                problem = mismatch(registry.config.fingerprint, fingerprint(model, names))
            except (AttributeError, TypeError) as e:  # the model lacks the registry's layers altogether
                problem = f"the model has no edited layer {names}: {e}"
            try:
                if problem:
                    raise ConfigMismatch(f"registry at {path} belongs to another model: {problem}")
                keys = key_source(registry.config.key_source, tokenizer, runtime.encoder_dtype)
            except Exception:
                registry.close()
                raise
        else:
            config = config or EditConfig()
            keys = key_source(config.key_source, tokenizer, runtime.encoder_dtype)  # built once: the encoder source loads a model
            registry = EditRegistry.create(path, registry_config(model, config, keys),
                                           backend=runtime.backend, device=device, key_dtype=runtime.key_dtype)
        return cls(registry, model, tokenizer, runtime, keys)

    # -- injection -------------------------------------------------------------------------------
    def _inject(self) -> None:
        for i, spec in enumerate(self.registry.config.layers):
            parent_name, _, child = spec.name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            base = getattr(parent, child)
            if isinstance(base, SolaLayer):
                raise ValueError(f"{spec.name} is already patched by another SolaEditor; close that one first")
            router = self._route if i == 0 else None  # layers are in forward order: the first one decides
            setattr(parent, child, SolaLayer(base, i, self.state, router))
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def unwrap(self) -> nn.Module:
        """Put the original linears back; the model is then exactly the object it was before `open`."""
        for spec in self.registry.config.layers:
            parent_name, _, child = spec.name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            layer = getattr(parent, child)
            if isinstance(layer, SolaLayer):
                setattr(parent, child, layer.base_layer)
        self._hook.remove()
        return self.model

    # -- routing (per forward) -------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs) -> None:
        """On a sequence's prompt pass, note where each row's prompt ends; decode steps keep the decision."""
        if self.state.forced is not None or cached_length(kwargs.get("past_key_values")) > 0:
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        mask = kwargs.get("attention_mask")
        self.registry.refresh()  # edits made by other processes since the last forward
        self.state.clear()
        self.state.positions = last_positions(mask, shaped.shape[0], shaped.shape[1], self.device)
        self.state.precomputed = self.keys.before_forward(input_ids, mask)
        self.state.decide = True

    def _route(self, x: torch.Tensor) -> None:
        """The first edited layer's decision: nearest active key per row, an edit only within the threshold."""
        s = self.state
        s.decide = False
        query = self.keys.query(x, s.positions, s.precomputed).detach().float()  # (B, d)
        if self._stop == "key":
            self._captured = query
            raise _Routed
        ids = self.registry.match(query).to(x.device)  # (B,), -1 = no edit
        rows = (ids >= 0).nonzero().flatten()  # (m,)
        try:
            slots = self.cache.slots(ids[rows].tolist()) if rows.numel() else None
        except CorruptEdit:  # a stored key or adapter fails its check: never apply it
            ids = self._drop_corrupt(ids)
            rows = (ids >= 0).nonzero().flatten()
            slots = self.cache.slots(ids[rows].tolist()) if rows.numel() else None
        s.edit_ids, s.rows = ids, rows
        s.slots = slots.to(x.device) if slots is not None else None
        if self._stop == "route":
            raise _Routed

    def _drop_corrupt(self, ids: torch.Tensor) -> torch.Tensor:
        """Unroute rows whose edit fails its integrity check: they get the base output, and it is logged."""
        for edit_id in [i for i in set(ids[ids >= 0].tolist()) if i not in self.cache]:
            try:
                self.registry.adapters([edit_id])
            except CorruptEdit as e:
                log.warning("edit %d not applied, serving the base output instead: %s", edit_id, e)
                ids = torch.where(ids == edit_id, torch.full_like(ids, -1), ids)
        return ids

    def _on_change(self, event: dict) -> None:
        for edit_id in event.get("deactivated", []):
            self.cache.evict(edit_id)

    def _run_until_routed(self, enc: dict, stop: str) -> None:
        """Forward only as far as the first edited layer: enough for a key ("key") or a decision ("route")."""
        self._stop = stop
        try:
            with torch.no_grad():
                self.model(**with_positions(enc))
        except _Routed:
            pass
        finally:
            self._stop = None

    # -- public API ------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> dict:
        """Tokenize a batch the same way for keys, routing and generation (left padding)."""
        return encode(self.model, self.tokenizer, prompts, self.device)

    def edit(self, prompt: str, target: str, train: TrainConfig | None = None) -> int:
        """Teach the model `prompt` -> `target` with a new frozen adapter; returns the new edit id."""
        check_edit(self.model, self.tokenizer, prompt, target)
        prompt_ids = self.encode([prompt])["input_ids"]  # (1, P)
        target_ids = self.tokenizer(target, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
        full = torch.cat([prompt_ids, target_ids], dim=1)  # (1, P + n)
        key = self.key(prompt)
        shapes = [(spec.in_features, spec.out_features) for spec in self.registry.config.layers]
        cfg = self.registry.config
        adapter, info = train_adapter(self.model, self.state, shapes, full, target_ids.shape[1],
                                      cfg.rank, cfg.alpha, train or TrainConfig())
        return self.registry.add(prompt, target, key.cpu().numpy(), adapter, info)

    def key(self, prompt: str) -> torch.Tensor:
        """The routing key `prompt` gets (the same vector it is queried with when served)."""
        self._run_until_routed(self.encode([prompt]), "key")
        key, self._captured = self._captured[0], None
        return key

    def route(self, prompts: list[str]) -> list[int | None]:
        """The edit that fires for each prompt, or None; runs the model only up to the first edited layer."""
        self._run_until_routed(self.encode(prompts), "route")
        return [None if i < 0 else i for i in self.state.edit_ids.tolist()]

    def logits(self, prompts: list[str]) -> torch.Tensor:
        """(B, vocab) next-token logits after each prompt, as served (routed edits applied)."""
        return next_token_logits(self.model, self.encode(prompts))

    def generate(self, prompts: list[str], max_new_tokens: int = 20, **kwargs) -> list[str]:
        """Greedy continuations; each sequence keeps the edit its prompt was routed to for every new token."""
        return greedy(self.model, self.tokenizer, self.encode(prompts), max_new_tokens, **kwargs)

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


def check_edit(model: nn.Module, tokenizer, prompt: str, target: str) -> None:
    """Refuse (ValidationError, one line) an edit that cannot be made, before anything is trained or written:
    empty or whitespace text, text that is not valid Unicode, or prompt + target longer than the model's context."""
    for name, text in (("prompt", prompt), ("target", target)):
        if not isinstance(text, str) or not text.strip():
            raise ValidationError(f"{name} must not be empty or only whitespace")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError(f"{name} is not valid Unicode text") from None
    n = len(tokenizer(prompt)["input_ids"]) + len(tokenizer(target, add_special_tokens=False)["input_ids"])
    limit = context_length(model)
    if limit and n > limit:
        raise ValidationError(f"prompt and target are {n} tokens; the model's context is {limit}")


def registry_config(model: nn.Module, config: EditConfig, keys: KeySource) -> RegistryConfig:
    """The persisted settings of a new registry for `model`: layers in forward order, shapes, fingerprint."""
    names = config.layers or default_layers(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [n for n in names if n not in order]
    if missing:
        raise ValidationError(f"the model has no module named {missing[0]!r}")
    names = sorted(names, key=order.__getitem__)
    specs = [LayerSpec(n, *linear_shape(model.get_submodule(n))) for n in names]
    return RegistryConfig(key_dim=keys.dim(specs[0].in_features), layers=specs, rank=config.rank,
                          alpha=config.alpha, metric=config.metric, threshold=config.threshold,
                          supersede_within=config.supersede_within,
                          key_source=keys.name, fingerprint=fingerprint(model, names))
