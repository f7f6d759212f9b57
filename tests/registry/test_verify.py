"""verify(): finds corruption written behind the registry's back; repair never deletes edits."""
import json
import struct

import lmdb
import pytest
from registry_helpers import make_adapter, make_key, near

from registry import CorruptEdit, EditRegistry


def raw_edit(path, db: str, key: bytes, change) -> None:
    """Rewrite one value directly through lmdb (the registry must be closed)."""
    env = lmdb.open(str(path), subdir=True, max_dbs=8)
    handle = env.open_db(db.encode())
    with env.begin(write=True) as txn:
        txn.put(key, change(txn.get(key, db=handle)), db=handle)
    env.close()


def flip_last_byte(value: bytes) -> bytes:
    return value[:-1] + bytes([value[-1] ^ 0x01])


@pytest.fixture
def three_edits(tmp_path, config):
    """Edit 2 supersedes edit 1; edit 3 is unrelated. Returns the closed registry's path."""
    with EditRegistry.create(tmp_path / "r", config) as reg:
        reg.add("a", "A", make_key(1), make_adapter(config, 1))
        reg.add("a2", "A2", near(make_key(1)), make_adapter(config, 2))
        reg.add("c", "C", make_key(3), make_adapter(config, 3))
    return tmp_path / "r"


def test_clean_registry_verifies(three_edits):
    with EditRegistry.open(three_edits) as reg:
        reg.match(make_key(1)[None])  # also compare the built index
        report = reg.verify()
    assert report.ok and report.checked == 3 and report.problems == []


def test_corrupt_adapter_byte_is_found_and_repaired(three_edits):
    raw_edit(three_edits, "adapters", struct.pack(">Q", 2), flip_last_byte)
    with EditRegistry.open(three_edits) as reg:
        with pytest.raises(CorruptEdit, match="edit 2 adapter does not match its checksum"):
            reg.adapter(2)
        report = reg.verify()
        assert not report.ok and report.problems == ["edit 2 adapter does not match its checksum"]
        assert reg.get(2).status == "active"  # plain verify changes nothing
        report = reg.verify(repair=True)
        assert report.repaired[0] == "edit 2 rolled back: edit 2 adapter does not match its checksum"
        rec = reg.get(2)
        assert rec.status == "rolled_back" and rec.info["corrupt"].startswith("edit 2 adapter")
        assert reg.get(1).status == "active"  # the version it replaced serves again
        assert reg.match(make_key(1)[None]).tolist() == [1]
        assert reg.count() == 3 and reg.verify().ok


def test_corrupt_key_is_found(three_edits):
    raw_edit(three_edits, "keys", struct.pack(">Q", 3), lambda v: v[:-4])
    with EditRegistry.open(three_edits) as reg:
        assert reg.verify().problems == ["edit 3 key has 60 bytes, expected a multiple of 64"]


def test_wrong_counters_and_active_set_are_rebuilt(three_edits):
    raw_edit(three_edits, "meta", b"counts", lambda v: json.dumps({"active": 9}).encode())
    raw_edit(three_edits, "active", struct.pack(">Q", 1), lambda v: b"")  # 1 is superseded
    with EditRegistry.open(three_edits) as reg:
        problems = reg.verify().problems
        assert problems[0].startswith("status counters are wrong")
        assert problems[1] == "edit 1 is in the active set but not active"
        report = reg.verify(repair=True)
        assert any("counters and active set rebuilt" in line for line in report.repaired)
        assert reg.verify().ok and reg.count("active") == 2 and reg.count("superseded") == 1
        assert reg.match(make_key(1)[None]).tolist() == [2]


def test_stale_index_is_reported_and_rebuilt(reg):
    reg.add("a", "A", make_key(1), make_adapter(reg.config, 1))
    reg.match(make_key(1)[None])
    reg.key_index.remove([1])  # simulate a lost index update
    assert reg.verify().problems == ["edit 1 is active but missing from the active index"]
    reg.verify(repair=True)
    assert reg.match(make_key(1)[None]).tolist() == [1] and reg.verify().ok


def test_broken_version_links_are_reported(three_edits):
    def dangle(value: bytes) -> bytes:
        rec = json.loads(value)
        rec["supersedes"] = 77
        return json.dumps(rec).encode()

    raw_edit(three_edits, "records", struct.pack(">Q", 3), dangle)
    with EditRegistry.open(three_edits) as reg:
        assert reg.verify().problems == ["edit 3 supersedes edit 77, which does not exist"]
