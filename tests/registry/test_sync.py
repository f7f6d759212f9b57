"""Cross-process sync: another process's writes reach this one's index via refresh()."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from registry_helpers import make_adapter, make_key, near

import registry
from registry import EditRegistry

PYTHONPATH = os.pathsep.join([str(Path(registry.__file__).parents[1]), str(Path(__file__).parent)])


def in_other_process(path, code: str) -> None:
    script = textwrap.dedent("""
        from registry import EditRegistry
        from registry_helpers import make_adapter, make_key, near
        reg = EditRegistry.open({path!r})
    """).format(path=str(path)) + textwrap.dedent(code)
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "PYTHONPATH": PYTHONPATH})


def test_refresh_replays_another_process_writes_into_the_index(reg):
    a = reg.add("a", "A", make_key(1), make_adapter(reg.config, 1))
    b = reg.add("b", "B", make_key(2), make_adapter(reg.config, 2))
    assert reg.match(make_key(1)[None]).tolist() == [a]  # index built now
    seen = []
    reg.on_change(seen.append)
    in_other_process(reg.path, """
        new = reg.add("a2", "A2", near(make_key(1)), make_adapter(reg.config, 3))
        reg.rollback(2)
        reg.add("c", "C", make_key(4), make_adapter(reg.config, 4))
    """)
    assert reg.match(make_key(2)[None]).tolist() == [b]  # stale until refresh
    events = reg.refresh()
    assert [e["op"] for e in events] == ["add", "rollback", "add"] and events == seen
    assert events[0]["activated"] == [3] and events[0]["deactivated"] == [a]
    assert reg.match(np.stack([make_key(1), make_key(2), make_key(4)])).tolist() == [3, -1, 4]
    assert reg.refresh() == [] and reg.verify().ok


def test_writes_after_another_process_wrote_see_its_keys(reg):
    reg.add("a", "A", make_key(1), make_adapter(reg.config, 1))
    reg.match(make_key(1)[None])
    in_other_process(reg.path, """
        reg.add("b", "B", make_key(2), make_adapter(reg.config, 2))
    """)
    newer = reg.add("b2", "B2", near(make_key(2)), make_adapter(reg.config, 3))  # no refresh() call
    assert reg.get(2).superseded_by == newer
    assert reg.match(make_key(2)[None]).tolist() == [newer]


def test_own_writes_notify_listeners(reg):
    seen = []
    unsubscribe = reg.on_change(seen.append)
    a = reg.add("a", "A", make_key(1), make_adapter(reg.config, 1))
    reg.rollback(a)
    assert [(e["op"], e["activated"], e["deactivated"]) for e in seen] == [("add", [a], []), ("rollback", [], [a])]
    assert [e["seq"] for e in seen] == [1, 2]
    unsubscribe()
    reg.restore(a)
    assert len(seen) == 2
    assert reg.refresh() == []  # own writes are already seen


def test_a_reader_opened_before_writes_catches_up(tmp_path, config):
    with EditRegistry.create(tmp_path / "r", config) as writer:
        reader = EditRegistry.open(tmp_path / "r", readonly=True, backend="torch")
        assert reader.match(make_key(1)[None]).tolist() == [-1]
        writer.add("a", "A", make_key(1), make_adapter(config, 1))
        assert [e["activated"] for e in reader.refresh()] == [[1]]
        assert reader.match(make_key(1)[None]).tolist() == [1]
        reader.close()


def test_a_write_racing_ours_makes_ours_retry_on_a_fresh_view(reg):
    other = EditRegistry.open(reg.path)
    reg.add("a", "A", make_key(1), make_adapter(reg.config, 1))
    reg.match(make_key(1)[None])
    other.add("b", "B", make_key(2), make_adapter(reg.config, 2))
    raced = []

    def write_in_between(event):  # runs inside reg's write, after its refresh
        if not raced:
            raced.append(other.add("b2", "B2", near(make_key(2)), make_adapter(reg.config, 3)))

    reg.on_change(write_in_between)
    newest = reg.add("b3", "B3", near(make_key(2), seed=4), make_adapter(reg.config, 4))
    assert raced == [3] and newest == 4
    assert reg.get(3).superseded_by == 4  # our conflict check saw the racing write
    assert reg.match(make_key(2)[None]).tolist() == [4] and reg.verify().ok
    other.close()
