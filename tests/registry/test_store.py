"""The LMDB store: map growth by doubling, one shared environment per path, read-only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import registry
from registry.errors import ReadOnlyError, RegistryError
from registry.store import Store


def test_map_grows_from_a_tiny_size_without_losing_data(tmp_path):
    store = Store(tmp_path / "s", create=True, map_size=256 << 10)
    blob = os.urandom(50_000)
    for i in range(40):  # 2 MB in total: several doublings
        store.write(lambda txn, i=i: txn.put("adapters", i, blob + bytes([i])))
    assert store.map_size > 256 << 10
    with store.read() as txn:
        assert [i for i, _ in txn.items("adapters")] == list(range(40))
        assert all(value == blob + bytes([i]) for i, value in txn.items("adapters"))
    store.close()


def test_a_full_map_that_may_not_grow_is_a_clear_error(tmp_path):
    store = Store(tmp_path / "s", create=True, map_size=256 << 10, max_map_size=512 << 10)
    with pytest.raises(RegistryError, match="registry is full"):
        store.write(lambda txn: [txn.put("adapters", i, os.urandom(100_000)) for i in range(10)])
    with store.read() as txn:
        assert txn.entries("adapters") == 0  # the failed transaction left nothing behind
    store.close()


def test_one_environment_per_path_is_shared(tmp_path):
    first = Store(tmp_path / "s", create=True)
    second = Store(str(tmp_path / "s") + "/")
    assert first.env is second.env
    first.write(lambda txn: txn.put("meta", "x", b"1"))
    first.close()
    with second.read() as txn:  # still open: the second handle holds a reference
        assert txn.get("meta", "x") == b"1"
    second.close()
    with pytest.raises(RegistryError, match="closed"):
        second.env


def test_ids_iterate_in_numeric_order(tmp_path):
    store = Store(tmp_path / "s", create=True)
    store.write(lambda txn: [txn.put("records", i, b"") for i in (300, 2, 70000, 1)])
    with store.read() as txn:
        assert list(txn.ids("records")) == [1, 2, 300, 70000]
        assert list(txn.ids("records", start=3)) == [300, 70000]
    store.close()


def test_read_only_store_refuses_writes(tmp_path):
    Store(tmp_path / "s", create=True).close()
    store = Store(tmp_path / "s", readonly=True)
    with pytest.raises(ReadOnlyError, match="read-only"):
        store.write(lambda txn: txn.put("meta", "x", b"1"))
    with pytest.raises(RegistryError, match="already open read-only"):
        Store(tmp_path / "s")
    store.close()


def test_reader_adopts_a_map_grown_by_another_process(tmp_path):
    store = Store(tmp_path / "s", create=True, map_size=256 << 10)
    with store.read() as txn:
        assert txn.get("meta", "x") is None
    code = (
        "import os; from registry.store import Store\n"
        f"s = Store({str(tmp_path / 's')!r}, map_size=256 << 10)\n"
        "[s.write(lambda t, i=i: t.put('adapters', i, os.urandom(100_000))) for i in range(20)]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": str(Path(registry.__file__).parents[1])})
    with store.read() as txn:
        assert txn.entries("adapters") == 20
    store.write(lambda txn: txn.put("adapters", 99, os.urandom(100_000)))
    assert store.map_size >= 2 << 20
    store.close()
