"""SoLA edit registry: stores and finds edits (a routing key plus a frozen LoRA adapter each).

Knows nothing about transformers or tokenizers; the model side (``sola_core``) uses it.
"""
from .cache import AdapterCache
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
from .index import KeyIndex
from .registry import EditRegistry
from .types import LayerSpec, Record, RegistryConfig, VerifyReport

__all__ = [
    "AdapterCache", "BundleError", "ConfigMismatch", "CorruptEdit", "EditNotFound", "EditRegistry",
    "InvalidTransition", "KeyIndex", "LayerSpec", "ReadOnlyError", "Record", "RegistryConfig",
    "RegistryError", "SchemaError", "ValidationError", "VerifyReport", "__version__",
]
