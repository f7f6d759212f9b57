"""One thread owns the edited model; requests queue up for it and run together.

Every generation request waiting when the model frees up joins the next batch (up to `max_rows` rows), and so
does every one arriving within `gather_s` (10 ms: clients that got their replies together come back together, and
a lone first arrival would otherwise hold the rest back for a whole batch). The batch is decoded in one set of
forwards, each row with its own routed edit (or, under `sola serve --by-name`, the edit its request named) and
sampling (decode.py). Admin work (edit, rollback, restore) runs
alone between batches, in arrival order, so a batch never sees a registry change half-way: an edit is in effect
from the next batch on. Edits made by other processes are picked up by the router on each prompt pass.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

from .decode import Event, Sampling, decode

log = logging.getLogger(__name__)

Emit = Callable[[tuple], None]  # called on the worker thread; must hand the event over and return at once


@dataclass
class Generation:
    """Rows to decode. Events: ("start", [edit id or None per row]), then ("text", row, text, finish, tokens)
    until every row has finished, or ("error", message) instead."""

    prompts: list[list[int]]
    sampling: list[Sampling]
    emit: Emit
    edits: list[int | None] | None = None  # per row, the edit named by the request (None: base); None: route
    cancelled: bool = False  # the client went away: stop spending forwards on it


@dataclass
class Admin:
    """A call on the editor, run alone between batches. Events: ("done", result) or ("error", exception)."""

    run: Callable[[Any], Any]
    emit: Emit


@dataclass
class Stats:
    batches: int = 0
    rows: int = 0
    largest: int = 0


class Batcher:
    def __init__(self, editor, end_tokens: set[int], max_rows: int = 16, gather_s: float = 0.01) -> None:
        self.editor, self.end_tokens, self.max_rows, self.gather_s = editor, end_tokens, max_rows, gather_s
        self.stats = Stats()
        self._jobs: deque = deque()
        self._ready = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="sola-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._ready:
            self._closing = True
            self._ready.notify()
        self._thread.join()

    def submit(self, job: Generation | Admin) -> None:
        with self._ready:
            self._jobs.append(job)
            self._ready.notify()

    def pending(self) -> int:
        return len(self._jobs)

    # -- the worker thread -----------------------------------------------------------------------
    def _next(self) -> list[Generation] | Admin | None:
        """The next admin job alone, or as many waiting generations as fit in one batch (None: closing)."""
        with self._ready:
            while not self._jobs and not self._closing:
                self._ready.wait()
            if self._closing:
                return None
            if isinstance(self._jobs[0], Admin):
                return self._jobs.popleft()
            batch, rows = [], 0
            deadline = time.monotonic() + self.gather_s
            while True:
                while self._jobs and isinstance(self._jobs[0], Generation):
                    job = self._jobs[0]
                    if batch and rows + len(job.prompts) > self.max_rows:
                        return batch
                    self._jobs.popleft()
                    if not job.cancelled:
                        batch.append(job)
                        rows += len(job.prompts)
                left = deadline - time.monotonic()
                if self._jobs or self._closing or rows >= self.max_rows or left <= 0:
                    return batch  # full, an admin job is next, or the gathering time is up
                self._ready.wait(left)

    def _work(self) -> None:
        while (work := self._next()) is not None:
            if isinstance(work, Admin):
                try:
                    work.emit(("done", work.run(self.editor)))
                except Exception as e:  # handed to the request that asked; the server decides what the client sees
                    work.emit(("error", e))
            elif work:
                self._generate(work)

    def _generate(self, jobs: list[Generation]) -> None:
        owner = [(job, i) for job in jobs for i in range(len(job.prompts))]  # batch row -> (job, its row)
        prompts = [job.prompts[i] for job, i in owner]
        sampling = [job.sampling[i] for job, i in owner]
        self.stats.batches += 1
        self.stats.rows += len(owner)
        self.stats.largest = max(self.stats.largest, len(owner))

        def started() -> None:
            routed = self.editor.routed()
            start = 0
            for job in jobs:
                job.emit(("start", routed[start:start + len(job.prompts)]))
                start += len(job.prompts)

        def emit(ev: Event) -> None:
            job, i = owner[ev.row]
            job.emit(("text", i, ev.text, ev.finish, ev.tokens))

        named = {job.edits is not None for job in jobs}  # a server names every request's edit or none (--by-name)
        try:
            if len(named) > 1:
                raise ValueError("a batch mixes requests that name their edit with requests routed by their text")
            with self.editor.router.pinned([job.edits[i] for job, i in owner]) if True in named else nullcontext():
                decode(self.editor.model, self.editor.tokenizer, prompts, sampling, self.end_tokens, emit,
                       on_prompt_pass=started, cancelled=lambda row: owner[row][0].cancelled)
        except Exception as e:  # a bug or the device failing: every request of the batch gets the error
            log.exception("batch of %d rows failed", len(owner))
            for job in jobs:
                job.emit(("error", f"generation failed: {type(e).__name__}"))
