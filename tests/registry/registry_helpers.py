"""Test data for the registry suite: a small two-layer config, random keys and adapters."""
import numpy as np
import torch

from registry import EditRegistry, LayerSpec, RegistryConfig

KEY_DIM = 16


def make_config(**overrides) -> RegistryConfig:
    fields = dict(key_dim=KEY_DIM, layers=[LayerSpec("mlp.0", 12, 10), LayerSpec("mlp.1", 12, 10)],
                  rank=2, alpha=4.0, metric="cosine", threshold=0.05, key_source="layer",
                  fingerprint={"model": "tiny", "sha": "abc"})
    fields.update(overrides)
    return RegistryConfig(**fields)


def make_adapter(config: RegistryConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, layer in enumerate(config.layers):
        tensors[f"{i}.A"] = torch.randn(config.rank, layer.in_features, generator=gen)
        tensors[f"{i}.B"] = torch.randn(layer.out_features, config.rank, generator=gen)
    return tensors


def make_key(seed: int, dim: int = KEY_DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def near(key: np.ndarray, seed: int = 99, scale: float = 1e-3) -> np.ndarray:
    """A key within any reasonable threshold of ``key``."""
    return (key + scale * make_key(seed, len(key))).astype(np.float32)


def damage(reg: EditRegistry, write) -> None:
    """Run ``write(txn)`` on an open registry's store, below every rule of the registry (bit rot, a lost entry,
    an older schema): the one place the registry suite reaches past the public API."""
    reg._store.write(write)
