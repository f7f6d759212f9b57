"""SoLA edit registry: stores and finds edits (a routing key plus a frozen LoRA adapter each).

Knows nothing about transformers or tokenizers; the model side (``sola_core``) uses it. ``AdapterCache`` and
``KeyIndex`` (torch, faiss) are imported on first use, so tools that only read edits stay light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .codec import LIBRARY_VERSION as __version__
from .errors import (
    BundleError,
    ConfigMismatch,
    CorruptEdit,
    EditNotFound,
    InvalidTransition,
    ReadOnlyError,
    RegistryError,
    SchemaError,
    ValidationError,
)
from .registry import EditRegistry
from .types import LayerSpec, Record, RegistryConfig, VerifyReport

if TYPE_CHECKING:
    from .cache import AdapterCache
    from .index import KeyIndex

_LAZY = {"AdapterCache": ".cache", "KeyIndex": ".index"}

__all__ = [
    "AdapterCache", "BundleError", "ConfigMismatch", "CorruptEdit", "EditNotFound", "EditRegistry",
    "InvalidTransition", "KeyIndex", "LayerSpec", "ReadOnlyError", "Record", "RegistryConfig",
    "RegistryError", "SchemaError", "ValidationError", "VerifyReport", "__version__",
]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value
