"""A real `sola serve` in its own process on a free loopback port, over a tiny Llama with a chat template."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from sola_core.cli import cli
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`python -m sola_core ... serve` as a subprocess; stopped (and its log kept for failures) by `stop`."""

    def __init__(self, registry: str, model: str, log: Path, *extra: str) -> None:
        self.port, self.log_path = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        argv = [sys.executable, "-m", "sola_core", "--registry", registry, "--model", model, "serve",
                "--port", str(self.port), "--served-model-name", "tiny", *extra]
        self.log = open(log, "w")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"sola serve exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"sola serve did not answer /health in 120 s:\n{log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


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
