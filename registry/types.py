"""Plain data held by a registry: its configuration and one record per edit."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ValidationError

ACTIVE, SUPERSEDED, ROLLED_BACK = "active", "superseded", "rolled_back"
STATUSES = (ACTIVE, SUPERSEDED, ROLLED_BACK)
METRICS = ("cosine", "l2")


def adapter_names(layer: int) -> tuple[str, str]:
    """The names one adapter's A (rank, in) and B (out, rank) of edited layer number `layer` are held under."""
    return f"{layer}.A", f"{layer}.B"


def is_tombstone(rec: dict) -> bool:
    """A rolled-back edit (a stored record's dict) keeps its keys as a tombstone unless repair rolled it back for
    being corrupt (see nearest.routed)."""
    return rec.get("status") == ROLLED_BACK and "corrupt" not in (rec.get("info") or {})


def check_text(name: str, text: Any) -> str:
    """The one rule for any text a user gives (prompt, target, paraphrase, query), wherever it enters: a
    non-empty string of valid Unicode (JSON allows a lone surrogate; tokenizers, LMDB and terminals do not)."""
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(f"{name} must be a non-empty string, not only whitespace")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{name} is not valid Unicode text (it holds a lone surrogate)") from None
    return text


def check_edit_text(prompt: Any, target: Any, paraphrases: Any = (), subject: Any = None) -> list[str]:
    """An edit's prompt, target, paraphrases and subject (None: not given) by `check_text`; returns the
    paraphrases as a list."""
    if isinstance(paraphrases, str) or not all(isinstance(p, str) for p in paraphrases):
        raise ValidationError("paraphrases must be a list of strings")
    for name, text in (("prompt", prompt), ("target", target), *(("paraphrase", p) for p in paraphrases)):
        check_text(name, text)
    if subject is not None:
        check_text("subject", subject)
    return list(paraphrases)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class LayerSpec:
    """One edited linear layer: each edit stores A (rank, in) and B (out, rank) for it."""

    name: str
    in_features: int
    out_features: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValidationError(f"layer name must be a non-empty string, got {self.name!r}")
        _positive_int(f"in_features of layer {self.name}", self.in_features)
        _positive_int(f"out_features of layer {self.name}", self.out_features)


@dataclass
class RegistryConfig:
    """What every edit in one registry shares; persisted once, checked on import."""

    key_dim: int
    layers: list[LayerSpec]
    rank: int
    alpha: float
    metric: str
    threshold: float
    key_source: str
    fingerprint: dict = field(default_factory=dict)
    # A new edit supersedes the nearest active one only this close (None: the threshold): a loose routing
    # threshold (a sentence-encoder key) must not let one fact replace another that merely routes nearby.
    supersede_within: float | None = None

    def __post_init__(self) -> None:
        _positive_int("key_dim", self.key_dim)
        _positive_int("rank", self.rank)
        self.layers = [_as_layer(layer) for layer in self.layers]
        if not self.layers:
            raise ValidationError("layers must name at least one edited layer")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise ValidationError(f"layer names must be unique, got {names}")
        if self.metric not in METRICS:
            raise ValidationError(f"metric must be 'cosine' or 'l2', got {self.metric!r}")
        self.alpha = _finite("alpha", self.alpha, minimum=0.0, strict=True)
        self.threshold = _finite("threshold", self.threshold, minimum=0.0, strict=False)
        if self.supersede_within is not None:
            self.supersede_within = _finite("supersede_within", self.supersede_within, minimum=0.0, strict=False)
        if not isinstance(self.key_source, str) or not self.key_source:
            raise ValidationError(f"key_source must be a non-empty string, got {self.key_source!r}")
        _check_json("fingerprint", self.fingerprint)

    @property
    def supersede_distance(self) -> float:
        """How close a stored key must be to a new one for the new edit to replace it (never beyond routing)."""
        return self.threshold if self.supersede_within is None else min(self.supersede_within, self.threshold)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RegistryConfig:
        return cls(**data)


def _as_layer(layer: LayerSpec | dict) -> LayerSpec:
    return layer if isinstance(layer, LayerSpec) else LayerSpec(**layer)


def _finite(name: str, value: Any, *, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{name} must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValidationError(f"{name} must be {relation} {minimum}, got {value!r}")
    return float(value)


def _check_json(name: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise ValidationError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{name} is not JSON-serialisable: {exc}") from None


@dataclass
class Record:
    """Everything about one edit except its key and adapter tensors."""

    id: int
    prompt: str
    target: str
    status: str
    created: float
    updated: float
    supersedes: int | None
    superseded_by: int | None
    key_sha256: str  # of all its keys: one per phrasing, the prompt's first
    adapter_sha256: str
    info: dict = field(default_factory=dict)
    paraphrases: list[str] = field(default_factory=list)  # other phrasings of the fact, each with its own key
    subject: str | None = None  # what the fact is about, as the prompt words it (optional; routing reads it)

    def to_dict(self) -> dict:
        return dict(vars(self))  # shallow: asdict's deep copy dominated bulk inserts

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        return cls(**data)


@dataclass
class VerifyReport:
    """Outcome of :meth:`EditRegistry.verify`; every problem names the edit it is about."""

    ok: bool
    checked: int
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
