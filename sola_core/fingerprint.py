"""A registry's model identity: its adapters and keys only mean something on the exact weights they were trained on.

A new registry is bound to its model once (`registry_config`: which layers, their shapes, their weights' hash);
every later use with a model checks it is that one (`check_model`), whether it serves (`SolaEditor.open`) or
only verifies (`sola verify --with-model`).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from registry import LayerSpec, RegistryConfig
from registry.errors import ConfigMismatch, ValidationError

from .layer import linear_shape
from .models import default_layers

if TYPE_CHECKING:
    from registry import EditRegistry

    from .config import EditConfig
    from .keys import KeySource


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


def model_fingerprint(config: RegistryConfig, model: nn.Module) -> dict:
    """`model`'s fingerprint over the layers a registry edits; refused (ConfigMismatch) when it lacks them."""
    names = [spec.name for spec in config.layers]
    try:
        return fingerprint(model, names)
    except (AttributeError, TypeError) as e:  # no such submodule, or not a linear
        raise ConfigMismatch(f"the model has no edited layer {names}: {e}") from None


def check_model(registry: EditRegistry, model: nn.Module) -> None:
    """Refuse (ConfigMismatch) a model other than the one the registry's adapters and keys were made on."""
    try:
        problem = mismatch(registry.config.fingerprint, model_fingerprint(registry.config, model))
    except ConfigMismatch as e:
        problem = str(e)
    if problem:
        raise ConfigMismatch(f"registry at {registry.path} belongs to another model: {problem}")


def registry_config(model: nn.Module, config: EditConfig, keys: KeySource) -> RegistryConfig:
    """The persisted settings of a new registry for `model`: layers in forward order, shapes, fingerprint."""
    names = config.layers or default_layers(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [n for n in names if n not in order]
    if missing:
        raise ValidationError(f"the model has no module named {missing[0]!r}")
    names = sorted(names, key=order.__getitem__)
    specs = []
    for name in names:
        try:
            specs.append(LayerSpec(name, *linear_shape(model.get_submodule(name))))
        except TypeError as e:  # the user named a module that is not a linear
            raise ValidationError(f"cannot edit {name!r}: {e}") from None
    return RegistryConfig(key_dim=keys.dim(specs[0].in_features), layers=specs, rank=config.rank,
                          alpha=config.alpha, metric=config.metric, threshold=config.threshold,
                          supersede_within=config.supersede_within,
                          key_source=keys.name, fingerprint=fingerprint(model, names))
