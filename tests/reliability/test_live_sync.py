"""One writer, many readers, live: a serving process sees the CLI's writes at its next forward, and two
writers at once are serialized without losing an edit. Real processes throughout."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from reliability_helpers import HERE, check_consistent, child_env, read_lines, sola, wait_for

from registry import EditRegistry

PROMPT, TARGET, OTHER = "The capital of Japan is", " Osaka", "Hello, how are you today?"


class Server:
    """`reliability_workers.py serve`: a SolaEditor on the tiny model, answering one generate per line."""

    def __init__(self, model_dir: str, registry: str):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "reliability_workers.py"), "serve", model_dir, registry],
                                     env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def ask(self, prompts: list[str]) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_new_tokens": 4}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0


def test_server_sees_cli_edit_rollback_and_restore_at_its_next_forward(registry_copy, model_dir):
    server = Server(model_dir, registry_copy)
    try:
        before = server.ask([PROMPT, OTHER])
        assert before["edits"] == [None, None]

        made = sola("edit", "--prompt", PROMPT, "--target", TARGET, "--lr", "0.05", "--max-steps", "80",
                    "--json", registry=registry_copy, model=model_dir)
        assert made.returncode == 0, made.stderr
        eid = json.loads(made.stdout)[0]["id"]
        edited = server.ask([PROMPT, OTHER])
        assert edited["edits"] == [eid, None] and edited["outputs"][0].startswith(TARGET)
        assert edited["outputs"][1] == before["outputs"][1]

        assert sola("rollback", str(eid), registry=registry_copy).returncode == 0
        rolled = server.ask([PROMPT, OTHER])
        assert rolled["edits"] == [None, None]
        assert rolled["logits"] == before["logits"] and rolled["outputs"] == before["outputs"]  # bit-identical

        assert sola("restore", str(eid), registry=registry_copy).returncode == 0
        restored = server.ask([PROMPT, OTHER])
        assert restored["edits"] == [eid, None] and restored["logits"] == edited["logits"]

        # each write was seen at the next forward, by replaying the log into the index built at start-up
        assert [r["generation"] for r in (edited, rolled, restored)] == [
            before["generation"] + 1, before["generation"] + 2, before["generation"] + 3]
        assert all(r["same_index"] for r in (edited, rolled, restored))
    finally:
        server.close()


def test_two_writers_at_once_are_serialized_and_lose_nothing(registry_copy, zygote, tmp_path):
    """Two processes add 60 edits each at the same time; a third of them rewrite three shared facts, so
    the conflict check must see the other process's commits: each fact ends with its newest version."""
    start = tmp_path / "go"
    with EditRegistry.open(registry_copy) as reg:
        before, generation = reg.count(), reg.generation
        pids = [zygote.spawn("hammer", path=registry_copy, seed=seed, n=60, start=str(start),
                             progress=str(tmp_path / f"w{seed}")) for seed in (1, 2)]
        wait_for(lambda: all(read_lines(tmp_path / f"w{s}") for s in (1, 2)), 120, "both writers ready")
        start.touch()
        for pid in pids:
            assert zygote.wait(pid) == {"signal": None, "code": 0}, zygote.stderr()
        reports = [read_lines(tmp_path / f"w{s}") for s in (1, 2)]
        ids = [[r["id"] for r in rep if r.get("event") == "done"] for rep in reports]
        assert len(ids[0]) == len(ids[1]) == 60
        assert sorted(ids[0] + ids[1]) == list(range(before + 1, before + 121))  # every edit, each id once
        assert max(ids[0]) > min(ids[1]) and max(ids[1]) > min(ids[0])  # the two really interleaved
        assert reg.count() == before + 120 and reg.generation == generation + 120
        check_consistent(registry_copy)
        facts = {}
        for rep in reports:
            for r in rep:
                if r.get("fact") is not None:
                    facts.setdefault(r["fact"], []).append(r["id"])
        keys = [reg.keys(max(versions))[0] for versions in facts.values()]
        assert reg.match(np.stack(keys)).tolist() == [max(v) for v in facts.values()]  # the newest won
        for versions in facts.values():
            assert [reg.get(i).status for i in sorted(versions)[:-1]] == ["superseded"] * (len(versions) - 1)
