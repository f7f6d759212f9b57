"""Crash safety: writers killed with SIGKILL at random points of edit, rollback, restore and import.

After every kill the registry opens, `sola verify` passes, every edit is whole or absent, the index equals
the active set, a live reader's replayed index agrees, and LMDB's writer lock is free again. Kills come
from outside at random moments (real timing, real SIGKILL) and, to hit the narrow windows inside the
write transaction for certain, from inside at chosen points (mid-transaction, before commit, after commit).
"""
from __future__ import annotations

import json
import os
import random
import signal
import statistics
import time

import pytest
from reliability_helpers import (check_consistent, make_bundle, read_lines, sola, store_ids, wait_for,
                                 writer_lock_is_free)

from registry import EditRegistry

OPS = ("edit", "rollback", "restore", "import")
LOG_OP = {"edit": "add", "rollback": "rollback", "restore": "restore", "import": "import"}
BUNDLE_SIZE = 20
KILLS_PER_OP = int(os.environ.get("SOLA_KILLS_PER_OP", "13"))  # 4 ops x 13 = 52 random external kills


def plan(rng: random.Random) -> list[tuple[str, list | None]]:
    """Random external kills for each op, plus one injected kill per op at each point of a write."""
    cycles = [(op, None) for op in OPS for _ in range(KILLS_PER_OP)]
    cycles += [(op, [point, rng.randint(1, 6)]) for op in OPS for point in ("put", "finish", "apply")]
    rng.shuffle(cycles)
    return cycles


@pytest.fixture
def crash_registry(registry_copy, tmp_path):
    """The seeded registry plus a bundle's worth of edits, a few of them rolled back (for restore)."""
    with EditRegistry.open(registry_copy) as reg:
        bundle = make_bundle(reg, str(tmp_path / "bundle.safetensors"), BUNDLE_SIZE, seed=0)
        ids = reg.import_(bundle)
        for edit_id in ids[::3]:
            reg.rollback(edit_id)
    return registry_copy, bundle


def test_sigkill_at_random_points_never_leaves_a_partial_edit(crash_registry, zygote, tmp_path):
    path, bundle = crash_registry
    rng = random.Random(1234)
    live = EditRegistry.open(path)  # stays open across every crash: a serving process's view
    live.indexed_ids()
    index = live.key_index
    estimate = {"edit": 0.5, "rollback": 0.05, "restore": 0.05, "import": 0.3}  # seconds, refined as we go
    kills = {"external": 0, "injected": 0}
    try:
        for n, (op, inject) in enumerate(plan(rng)):
            before, generation = store_ids(live), live.generation
            progress = tmp_path / f"progress-{n}"
            pid = zygote.spawn("crash_ops", path=path, op=op, seed=n, progress=str(progress), bundle=bundle,
                               inject=inject)
            if inject is None:
                wait_for(lambda: read_lines(progress), 120, f"worker {n} to start")
                time.sleep(rng.uniform(0, estimate[op]))
                os.kill(pid, signal.SIGKILL)
            status = zygote.wait(pid)
            assert status == {"signal": signal.SIGKILL, "code": None}, (op, inject, status, zygote.stderr())
            kills["external" if inject is None else "injected"] += 1

            done = [line for line in read_lines(progress) if line.get("event") == "done"]
            if done:
                estimate[op] = max(0.02, 1.5 * statistics.median(line["seconds"] for line in done))
            after = check_consistent(path, live)
            assert writer_lock_is_free(live), f"cycle {n}: a killed writer left the write lock held"
            assert live.key_index is index  # replayed into, never rebuilt

            # each edit whole or absent: the record count moved by whole operations only
            per_op = {"edit": 1, "import": BUNDLE_SIZE}.get(op, 0)
            added = len(after["records"]) - len(before["records"])
            assert added in (per_op * len(done), per_op * (len(done) + 1)), (op, inject, added, len(done))
            assert after["records"] >= before["records"]  # nothing is ever lost
            # every operation reported as done is durable: its log event is there
            for line in done:
                assert live.event(line["seq"])["op"] == LOG_OP[op]
            if inject is not None:  # a kill inside the transaction leaves nothing; after the commit, all of it
                committed = inject[0] == "apply"
                assert live.generation == generation + committed, (op, inject)
                assert added == (per_op if committed else 0)
    finally:
        live.close()
    assert kills == {"external": 4 * KILLS_PER_OP, "injected": 12}

    verified = sola("verify", "--json", registry=path)  # and the real CLI agrees, in a fresh process
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"], verified.stderr
    with EditRegistry.open(path, readonly=True) as reg:
        assert reg.stats()["next_id"] > max(reg.snapshot()[1]["records"])
