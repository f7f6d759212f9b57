"""Shared pieces of the reliability suite: model dirs, the real `sola` CLI as a subprocess, the zygote
that forks worker processes, and the invariant checks run after every crash."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import lmdb
import numpy as np
import safetensors.torch
import torch
from click.testing import CliRunner
from transformers import LlamaConfig, LlamaForCausalLM

from registry import EditRegistry
from registry.codec import adapter_shapes
from sola_core.cli import cli

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TRAIN_ARGS = ["--lr", "0.05", "--max-steps", "5"]  # fixtures need edits, not good ones


def save_model(path: Path, tokenizer, hidden: int, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def child_env(**extra: str) -> dict:
    """Environment for subprocesses: this checkout importable, one thread each (two shared cores)."""
    paths = [str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **extra}


def sola(*args: str, registry: str, model: str | None = None, timeout: float = 300,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The real CLI in its own process (`python -m sola_core`)."""
    argv = [*prefix, sys.executable, "-m", "sola_core", "--registry", registry]
    if model is not None:
        argv += ["--model", model]
    return subprocess.run([*argv, *args], env=child_env(), capture_output=True, text=True, timeout=timeout)


def run_cli_in(commands: list[list[str]], prefix: list[str]) -> list[dict]:
    """Run CLI commands in ONE child process started under `prefix` (setpriv / unshare)."""
    argv = [*prefix, sys.executable, str(HERE / "reliability_workers.py"), "cli", json.dumps(commands)]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def invoke(*args: str, registry: str, model: str | None = None):
    """The CLI in this process (same code path as `sola`, no process start-up)."""
    argv = ["--registry", registry] + (["--model", model] if model else []) + list(args)
    return CliRunner().invoke(cli, argv)


def assert_one_error_line(stderr: str, contains: str = "") -> None:
    """A refused command prints exactly one `Error: ...` line and no traceback."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr and contains in lines[0], stderr


def file_digest(path: str) -> str:
    """Hash of a registry's data file: unchanged bytes prove that nothing was written."""
    return hashlib.sha256(Path(path, "data.mdb").read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tamper(path: str, db: str, key: int | str, change) -> None:
    """Rewrite (or, when `change` returns None, delete) one stored value behind the registry's back."""
    env = lmdb.open(path, subdir=True, max_dbs=8)
    handle = env.open_db(db.encode())
    raw_key = struct.pack(">Q", key) if isinstance(key, int) else key.encode()
    with env.begin(write=True) as txn:
        value = change(txn.get(raw_key, db=handle))
        if value is None:
            txn.delete(raw_key, db=handle)
        else:
            txn.put(raw_key, value, db=handle)
    env.close()


def bundle_parts(path: str) -> tuple[dict, dict]:
    with safetensors.safe_open(path, "pt") as f:
        return json.loads(f.metadata()["manifest"]), {name: f.get_tensor(name) for name in f.keys()}


def save_bundle(path: Path, tensors: dict, manifest=None, raw_manifest: str | None = None) -> str:
    text = raw_manifest if raw_manifest is not None else json.dumps(manifest)
    safetensors.torch.save_file(tensors, str(path), metadata={"sola_bundle": "1", "manifest": text})
    return str(path)


def make_bundle(reg: EditRegistry, path: str, size: int, seed: int) -> str:
    """`size` edits with random keys and adapters for this registry's model, exported to one bundle file."""
    rng = np.random.default_rng(seed)
    items = [{"prompt": f"bundle fact {i}", "target": " x",
              "keys": rng.standard_normal(reg.config.key_dim).astype(np.float32),
              "adapter": {n: torch.from_numpy(rng.standard_normal(s).astype(np.float32))
                          for n, s in adapter_shapes(reg.config).items()}} for i in range(size)]
    with EditRegistry.create(f"{path}.source", reg.config) as source:
        source.add_many(items)
        source.export(path)
    return path


def store_ids(reg: EditRegistry) -> dict[str, set[int]]:
    """Edit ids present in each database of a registry (one read transaction)."""
    return reg.snapshot()[1]


def check_consistent(path: str, live: EditRegistry | None = None) -> dict[str, set[int]]:
    """The invariants that must hold after any crash; returns the ids per database.

    Every edit is whole (record, key and adapter, or none of them); `sola verify` passes; a freshly
    built index, the live registry's incrementally replayed index, the active set and the records'
    statuses all name the same edits.
    """
    result = invoke("verify", "--json", registry=path)
    assert result.exit_code == 0 and json.loads(result.stdout)["ok"], result.output
    with EditRegistry.open(path, readonly=True) as fresh:
        ids = store_ids(fresh)
        assert ids["records"] == ids["keys"] == ids["adapters"], ids
        active = {rec.id for rec in fresh.records("active")}
        assert ids["active"] == active
        assert fresh.indexed_ids() == active
        if live is not None:
            live.refresh()
            assert live.indexed_ids() == active
            assert live.generation == fresh.generation
    return ids


def damage(reg: EditRegistry, write) -> None:
    """Run ``write(txn)`` on an open registry's store, below every rule of the registry (bit rot, a bare write
    transaction): the one place the reliability suite reaches past the public API."""
    reg._store.write(write)


def writer_lock_is_free(reg: EditRegistry, timeout: float = 60.0) -> bool:
    """An empty write transaction completes: a killed writer did not leave LMDB's writer lock held."""
    done = threading.Event()

    def probe() -> None:
        damage(reg, lambda txn: None)  # commits nothing, writes nothing
        done.set()

    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout)


class Zygote:
    """A Python process with torch, transformers, the registry and the tiny model already loaded.

    `spawn` forks it (milliseconds instead of a multi-second interpreter start), so a test can run
    and SIGKILL many real worker processes. Requests and replies are JSON lines; workers report
    through files, never through the zygote's pipe.
    """

    def __init__(self, model_dir: str, workdir: Path):
        self.stderr_path = workdir / "zygote.stderr"
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "reliability_workers.py"), "zygote", model_dir], env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        assert self._reply(timeout=300) == {"ready": True}, self.stderr()

    def _reply(self, timeout: float) -> dict:
        result: list = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        assert result and result[0], f"zygote did not answer: {self.stderr()}"
        return json.loads(result[0])

    def _ask(self, request: dict, timeout: float = 60) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def spawn(self, job: str, **args) -> int:
        """Fork a worker running `reliability_workers.JOBS[job](model, tokenizer, **args)`; returns its pid."""
        return self._ask({"cmd": "spawn", "job": job, "args": args})["pid"]

    def wait(self, pid: int, timeout: float = 300) -> dict:
        """Reap a worker: {"signal": n or None, "code": n or None}."""
        return self._ask({"cmd": "wait", "pid": pid}, timeout)

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text()[-4000:]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


def read_lines(path: Path) -> list[dict]:
    """A worker's progress file: one JSON object per line (a line cut by SIGKILL is dropped)."""
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return lines


def wait_for(predicate, timeout: float, what: str, poll: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
