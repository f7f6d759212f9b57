"""A registry's model identity: its adapters and keys only mean something on the exact weights they were trained on."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from .layer import linear_shape


def fingerprint(model: nn.Module, layer_names: list[str]) -> dict:
    """Architecture, edited layers' names and shapes, and a hash of those layers' base weights."""
    cfg = getattr(model, "config", None)
    digest = hashlib.sha256()
    layers = []
    for name in layer_names:
        module = model.get_submodule(name)
        module = getattr(module, "base_layer", module)  # an already-patched model fingerprints the same
        layers.append([name, *linear_shape(module)])
        for p in (module.weight, getattr(module, "bias", None)):
            if p is not None:
                digest.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "layers": layers,
        "weights_sha256": digest.hexdigest(),
    }


def mismatch(stored: dict, actual: dict) -> str | None:
    """The first difference, worded for a user, or None when the model is the registry's."""
    for field in ("architecture", "model_type", "hidden_size", "num_layers", "vocab_size", "layers", "weights_sha256"):
        if stored.get(field) != actual.get(field):
            if field == "weights_sha256":
                return "the edited layers' weights differ from the model this registry was made for"
            return f"{field} is {actual.get(field)!r} but this registry was made for {stored.get(field)!r}"
    return None
