"""Fixtures for the reliability suite: saved tiny model directories, a registry with edits, a zygote."""
from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner
from reliability_helpers import TRAIN_ARGS, Zygote, save_model

from sola_core.cli import cli


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny random Llama of tests/conftest.py, saved as a model directory (what `--model` takes)."""
    return save_model(tmp_path_factory.mktemp("model"), tokenizer, hidden=64, seed=0)


@pytest.fixture(scope="session")
def narrow_model_dir(tmp_path_factory, tokenizer) -> str:
    """Same architecture, another hidden size."""
    return save_model(tmp_path_factory.mktemp("narrow"), tokenizer, hidden=32, seed=0)


@pytest.fixture(scope="session")
def retrained_model_dir(tmp_path_factory, tokenizer) -> str:
    """Same architecture and shapes, other weights."""
    return save_model(tmp_path_factory.mktemp("retrained"), tokenizer, hidden=64, seed=1)


@pytest.fixture(scope="session")
def seeded_registry(tmp_path_factory, model_dir) -> str:
    """A registry with two edits made through the CLI: 1 (France -> Lyon) active, 2 (planet) rolled back."""
    path = str(tmp_path_factory.mktemp("seeded") / "reg")
    runner = CliRunner()
    for args in (["init", "--key-source", "layer", "--threshold", "0.0001"],
                 ["edit", "--prompt", "The capital of France is", "--target", " Lyon", *TRAIN_ARGS],
                 ["edit", "--prompt", "The largest planet is", "--target", " Saturn", *TRAIN_ARGS],
                 ["rollback", "2"]):
        result = runner.invoke(cli, ["--registry", path, "--model", model_dir, *args])
        assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def registry_copy(tmp_path, seeded_registry) -> str:
    """A private copy of the seeded registry (LMDB files copy safely while nothing writes)."""
    path = str(tmp_path / "reg")
    shutil.copytree(seeded_registry, path)
    return path


@pytest.fixture(scope="session")
def zygote(tmp_path_factory, model_dir):
    """A process that has imported everything and loaded the model, and forks workers on request."""
    z = Zygote(model_dir, tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


@pytest.fixture(autouse=True)
def _few_threads():
    """Two cores shared with subprocesses: one torch thread in the test process keeps timings sane."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
