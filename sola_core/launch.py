"""A server as a real subprocess on a free loopback port, ready once its health endpoint answers.

The serve tests and the serve benchmarks start `sola serve` (and vLLM) this way; it lives in the package because
bench/ must not import tests/.
"""
from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """`argv` (which must listen on `port`) started with its output in `log`; `stop()` ends it."""

    def __init__(self, argv: list[str], port: int, log: Path, env: dict | None = None, health: str = "/health",
                 timeout_s: float = 120) -> None:
        self.port, self.log_path = port, Path(log)
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise RuntimeError(f"{Path(argv[0]).name} exited with {self.process.returncode}:\n"
                                   f"{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + health, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"no answer on {self.url}{health} in {timeout_s:.0f} s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
