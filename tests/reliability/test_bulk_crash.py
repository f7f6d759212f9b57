"""An interrupted `sola edit --file`: every batch stored before the kill is whole, the registry verifies, and
running the file again adds exactly what is missing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from reliability_helpers import TRAIN_ARGS, check_consistent, child_env, sola, wait_for

from registry import EditRegistry

LINES = 18
BATCH = 3


def stored(path: str) -> int:
    if not EditRegistry.exists(path):
        return 0
    with EditRegistry.open(path, readonly=True) as reg:
        return reg.count()


def test_sigkill_during_edit_file_keeps_whole_batches_and_a_rerun_finishes(tmp_path, model_dir):
    path, edits = str(tmp_path / "reg"), tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": f"Fact number {i} is", "target": f" {i * 7}"}) + "\n"
                             for i in range(LINES)))
    assert sola("init", "--key-source", "layer", "--threshold", "0.0001", registry=path, model=model_dir).returncode == 0
    argv = [sys.executable, "-m", "sola_core", "--registry", path, "--model", model_dir, "edit", "--file", str(edits),
            "--batch-size", str(BATCH), *TRAIN_ARGS]
    for _ in range(2):  # kill once a batch more than before is stored (one more may slip in before the kill)
        writer = subprocess.Popen(argv, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = stored(path)
        wait_for(lambda: stored(path) >= before + BATCH or writer.poll() is not None, 120,
                 "batches to be stored")
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait() == -signal.SIGKILL, writer.stderr.read()
        count = stored(path)
        assert count % BATCH == 0 and before < count < LINES  # whole batches only, and not all of them
        check_consistent(path)  # every edit whole, `sola verify` passes, the index equals the active set
    done = sola("edit", "--file", str(edits), "--batch-size", str(BATCH), *TRAIN_ARGS, "--json",
                registry=path, model=model_dir)
    assert done.returncode == 0, done.stderr
    added = json.loads(done.stdout)
    assert f"skipped {LINES - len(added)} of {LINES} edits" in done.stderr
    with EditRegistry.open(path, readonly=True) as reg:
        records = list(reg.records())
    assert sorted(r.prompt for r in records) == sorted(f"Fact number {i} is" for i in range(LINES))
    assert all(r.status == "active" for r in records)
