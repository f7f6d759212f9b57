"""Load: one writer editing (and rolling back and restoring) while four reader processes generate, for a
bounded time (SOLA_SOAK_SECONDS, default 20). Every reader checks every row of every batch against its
own replayed view of the registry; the run must end with zero errors and every reader having seen every
committed edit, routing each prompt to its final version."""
from __future__ import annotations

import os
import time

from reliability_helpers import check_consistent, read_lines, wait_for

from registry import EditRegistry

SOAK_SECONDS = float(os.environ.get("SOLA_SOAK_SECONDS", "20"))
PROMPTS = ["The capital of France is", "The capital of Japan is", "The capital of Italy is", "The largest planet is",
           "The chemical symbol for gold is", "Water boils at", "The quick brown fox", "Fact number seven is"]
UNRELATED = ["Hello, how are you today?"]


def test_one_writer_four_readers_zero_errors_and_every_edit_seen(registry_copy, zygote, tmp_path):
    reader_stop, writer_stop = tmp_path / "readers-stop", tmp_path / "writer-stop"
    readers = [zygote.spawn("soak_reader", path=registry_copy, progress=str(tmp_path / f"reader-{i}"),
                            stop=str(reader_stop), prompts=PROMPTS + UNRELATED) for i in range(4)]
    wait_for(lambda: all(read_lines(tmp_path / f"reader-{i}") for i in range(4)), 300, "readers to start", 0.1)
    writer = zygote.spawn("soak_writer", path=registry_copy, progress=str(tmp_path / "writer"), stop=str(writer_stop),
                          prompts=PROMPTS, seed=7)
    time.sleep(SOAK_SECONDS)
    writer_stop.touch()
    assert zygote.wait(writer) == {"signal": None, "code": 0}, zygote.stderr()
    reader_stop.touch()  # readers now make one last round, after the writer's last commit
    for pid in readers:
        assert zygote.wait(pid) == {"signal": None, "code": 0}, zygote.stderr()

    writes = [line for line in read_lines(tmp_path / "writer") if line.get("event") == "done"]
    edits = [line["id"] for line in writes if line["op"] == "edit"]
    assert len(edits) >= 2, "the writer made too few edits to test anything"
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        generation = reg.generation
        final = {rec.prompt: rec.id for rec in reg.records("active")}
    reports = [read_lines(tmp_path / f"reader-{i}")[-1] for i in range(4)]
    for report in reports:
        assert report["event"] == "finished" and report["n_errors"] == 0, report["errors"]
        assert report["rounds"] >= 3  # each reader generated throughout, not just at the end
        assert report["checked_outputs"] > 0  # and the edits it routed to did produce their targets
        assert set(edits) <= set(report["seen"])  # every committed edit reached every reader
        assert report["routes"] == [final.get(prompt) for prompt in PROMPTS + UNRELATED]
        assert report["generation"] == generation and report["same_index"]  # log replay, no rebuild
    check_consistent(registry_copy)
    print(f"soak {SOAK_SECONDS:.0f} s: {len(writes)} writes ({len(edits)} edits), reader rounds "
          f"{[r['rounds'] for r in reports]}, outputs checked {[r['checked_outputs'] for r in reports]}, "
          f"errors {[r['n_errors'] for r in reports]}")
