"""A real `sola serve` in its own process on a free loopback port, over a tiny Llama with a chat template."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sola_core.cli import cli
from sola_core.launch import Launched, free_port
from tests.conftest import make_model
from tests.sola_core.test_chat import CHATML

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
TRAIN = ["--lr", "0.1", "--max-steps", "300", "--margin", "0.5"]
FRANCE, JAPAN = "The capital of France is", "What is the capital of Japan?"


def sola(registry: str, model: str, *args: str) -> dict | list:
    """The CLI in this process (another process than the server's), its --json output parsed."""
    result = CliRunner().invoke(cli, ["--registry", registry, "--model", model, *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama with ChatML as its template; the model ends replies at the tokenizer's <eos>."""
    path = tmp_path_factory.mktemp("chat-model")
    model = make_model("llama", len(tokenizer))
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def served_registry(tmp_path_factory, chat_model_dir) -> dict:
    """A registry (encoder key) with a completion edit and a chat edit, made through the CLI."""
    path = str(tmp_path_factory.mktemp("served") / "reg")
    sola(path, chat_model_dir, "init")
    france = sola(path, chat_model_dir, "edit", "--prompt", FRANCE, "--target", " Lyon", *TRAIN)[0]["id"]
    japan = sola(path, chat_model_dir, "edit", "--prompt", JAPAN, "--target", "Osaka", "--form", "chat", *TRAIN)[0]["id"]
    return {"path": path, "model": chat_model_dir, "france": france, "japan": japan}


class Served(Launched):
    """`python -m sola_core ... serve` as a subprocess on a free port; `stop()` ends it."""

    def __init__(self, registry: str, model: str, log: Path, *extra: str) -> None:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [sys.executable, "-m", "sola_core", "--registry", registry, "--model", model, "serve",
                "--port", str(port), "--served-model-name", "tiny", *extra]
        super().__init__(argv, port, log, env=env)


@pytest.fixture(scope="module")
def server(served_registry, tmp_path_factory):
    """One server per test module, admin endpoints on, over its own copy of the registry."""
    import shutil

    path = str(tmp_path_factory.mktemp("live") / "reg")
    shutil.copytree(served_registry["path"], path)
    s = Served(path, served_registry["model"], tmp_path_factory.mktemp("log") / "serve.log", "--admin-token", TOKEN)
    s.registry, s.model, s.france, s.japan = path, served_registry["model"], served_registry["france"], \
        served_registry["japan"]
    yield s
    s.stop()
