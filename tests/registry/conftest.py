"""Fixtures: a config and a fresh registry in tmp_path."""
import pytest
from registry_helpers import make_config

from registry import EditRegistry, RegistryConfig


@pytest.fixture
def config() -> RegistryConfig:
    return make_config()


@pytest.fixture
def reg(tmp_path, config):
    with EditRegistry.create(tmp_path / "reg", config) as registry:
        yield registry
