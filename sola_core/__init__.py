"""SoLA model side: the edited layer, key sources, adapter training and the SolaEditor API.

`SolaEditor` and `load_model` are imported on first use (module `__getattr__`): they bring torch and
transformers, which `python -m sola_core list` and the other admin commands never need.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import EditConfig, RuntimeConfig, TrainConfig

if TYPE_CHECKING:
    from .editor import SolaEditor
    from .models import load_model

_LAZY = {"SolaEditor": ".editor", "load_model": ".models"}

__all__ = ["SolaEditor", "EditConfig", "RuntimeConfig", "TrainConfig", "load_model"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
