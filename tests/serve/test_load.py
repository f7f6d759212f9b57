"""Load: 8 clients x 25 requests against a real `sola serve` while another process's writer rolls an edit back
and restores it; zero errors, requests batched, and every answer the one the registry called for when served."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from registry import EditRegistry
from tests.serve.conftest import FRANCE

PROMPTS = [FRANCE, "Hello, how are you today?", "The quick brown fox jumps over", FRANCE]
CLIENTS, REQUESTS = 8, 25


def ask(url: str, prompt: str) -> tuple[float, float, dict]:
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 4,
                                                  "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return start, time.monotonic(), r.json()["choices"][0]


class Toggler:
    """Rolls one edit back and restores it, over and over, recording when each change may have landed."""

    def __init__(self, path: str, edit_id: int) -> None:
        self.path, self.edit_id = path, edit_id
        self.changes: list[tuple[float, float, bool]] = []  # (before, after, active afterwards)
        self.stop = threading.Event()

    def run(self) -> None:
        with EditRegistry.open(self.path) as registry:
            active = True
            while not self.stop.is_set():
                before = time.monotonic()
                (registry.rollback if active else registry.restore)(self.edit_id)
                active = not active
                self.changes.append((before, time.monotonic(), active))
                time.sleep(0.05)

    def possible(self, start: float, end: float) -> set[bool]:
        """Every state the edit may have been in at some moment of [start, end]."""
        states, current = set(), True
        for before, after, active in self.changes:
            if after <= start:
                current = active
            elif before <= end:
                states |= {not active, active}  # this change may have landed before, during or after the request
        return states | {current}


def test_concurrent_clients_while_an_edit_is_rolled_back_and_restored(server):
    base = {p: ask(server.url, p)[2] for p in PROMPTS}
    assert base[FRANCE]["sola_edit"] == server.france
    edited = base[FRANCE]["text"]
    with EditRegistry.open(server.registry) as registry:
        registry.rollback(server.france)
    unedited = ask(server.url, FRANCE)[2]
    assert unedited["sola_edit"] is None and unedited["text"] != edited
    with EditRegistry.open(server.registry) as registry:
        registry.restore(server.france)
    toggler = Toggler(server.registry, server.france)
    writer = threading.Thread(target=toggler.run)
    writer.start()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            jobs = [pool.submit(ask, server.url, PROMPTS[(c + i) % len(PROMPTS)])
                    for c in range(CLIENTS) for i in range(REQUESTS)]
            answers = [(PROMPTS[(c + i) % len(PROMPTS)], *job.result())
                       for (c, i), job in zip(((c, i) for c in range(CLIENTS) for i in range(REQUESTS)), jobs)]
    finally:
        toggler.stop.set()
        writer.join()
    assert len(answers) == CLIENTS * REQUESTS
    assert len(toggler.changes) >= 4, "the writer barely ran"
    routed = {True: 0, False: 0}
    for prompt, start, end, choice in answers:
        if prompt != FRANCE:
            assert choice == base[prompt]
            continue
        active = choice["sola_edit"] == server.france
        assert choice["sola_edit"] in (server.france, None)
        assert choice["text"] == (edited if active else unedited["text"])
        assert active in toggler.possible(start, end), f"served {'with' if active else 'without'} the edit " \
                                                       f"when the registry said otherwise ({start:.3f}-{end:.3f})"
        routed[active] += 1
    assert routed[True] and routed[False], routed
    assert httpx.get(server.url + "/health").json()["largest_batch"] > 1
