"""EditRegistry: records, supersede/rollback/restore, errors, persistence."""
import numpy as np
import pytest
import torch
from registry_helpers import make_adapter, make_config, make_key, near

from registry import (
    AdapterCache, EditNotFound, EditRegistry, InvalidTransition, ReadOnlyError, RegistryError,
    SchemaError, ValidationError,
)
from registry.store import Store


def add(reg, seed, key=None, **info):
    key = make_key(seed) if key is None else key
    return reg.add(f"prompt {seed}", f" target {seed}", key, make_adapter(reg.config, seed), info)


def test_add_get_records_count(reg):
    ids = [add(reg, seed, steps=seed) for seed in range(3)]
    assert ids == [1, 2, 3]
    rec = reg.get(2)
    assert (rec.prompt, rec.target, rec.status, rec.info) == ("prompt 1", " target 1", "active", {"steps": 1})
    assert rec.supersedes is None and rec.superseded_by is None and len(rec.adapter_sha256) == 64
    assert [r.id for r in reg.records()] == ids
    assert reg.count() == reg.count("active") == 3 and reg.count("rolled_back") == 0
    np.testing.assert_array_equal(reg.keys(3)[0], make_key(2))
    assert torch.equal(reg.adapter(1)["1.B"], make_adapter(reg.config, 0)["1.B"])
    assert reg.generation == 3


def test_new_edit_supersedes_the_nearest_within_threshold_and_rollback_brings_it_back(reg):
    old = add(reg, 1)
    other = add(reg, 2)
    new = add(reg, 3, key=near(make_key(1)))
    assert reg.get(old).status == "superseded" and reg.get(old).superseded_by == new
    assert reg.get(new).supersedes == old and reg.get(other).status == "active"
    assert reg.match(make_key(1)[None]).tolist() == [new]
    reg.rollback(new)
    assert reg.get(old).status == "active" and reg.get(old).superseded_by is None
    assert reg.get(new).status == "rolled_back"
    assert reg.match(make_key(1)[None]).tolist() == [old]
    assert reg.count("active") == 2 and reg.count("rolled_back") == 1 and reg.count("superseded") == 0


def test_a_key_that_only_routes_nearby_does_not_supersede(tmp_path):
    """supersede_within below the threshold: two distinct facts with close keys both stay active, and
    each key routes to its own edit (the nearest), not to whichever came last."""
    config = make_config(threshold=0.3, supersede_within=1e-3)
    with EditRegistry.create(tmp_path / "r", config) as reg:
        first = add(reg, 1)
        close = near(make_key(1), scale=0.05)  # within the threshold, beyond the supersede distance
        second = add(reg, 2, key=close)
        assert reg.get(first).status == reg.get(second).status == "active"
        assert reg.match(np.stack([make_key(1), close])).tolist() == [first, second]
        again = add(reg, 3, key=make_key(1))  # the same key again: a new version of the first fact
        assert reg.get(first).superseded_by == again and reg.get(second).status == "active"


def test_restore_supersedes_again(reg):
    old = add(reg, 1)
    new = add(reg, 2, key=near(make_key(1)))
    reg.rollback(new)
    restored = reg.restore(new)
    assert restored.status == "active" and restored.supersedes == old
    assert reg.get(old).status == "superseded" and reg.get(old).superseded_by == new
    assert reg.match(near(make_key(1), seed=5)[None]).tolist() == [new]


def test_rollback_skips_versions_rolled_back_meanwhile(reg):
    first = add(reg, 1)
    second = add(reg, 2, key=near(make_key(1), seed=2))
    third = add(reg, 3, key=near(make_key(1), seed=3))
    reg.rollback(second)  # superseded: nothing comes back
    assert reg.get(first).status == "superseded"
    reg.rollback(third)  # the latest surviving version returns
    assert reg.get(first).status == "active"
    assert reg.match(make_key(1)[None]).tolist() == [first]


def test_far_keys_do_not_conflict_and_match_says_none(reg):
    a, b = add(reg, 1), add(reg, 2)
    assert reg.get(a).status == reg.get(b).status == "active"
    dist, ids = reg.nearest(np.stack([make_key(1), -make_key(1)]))
    assert ids[0] == a and dist[0] == pytest.approx(0, abs=1e-6)
    assert reg.match(np.stack([make_key(2), -make_key(1)])).tolist() == [b, -1]
    out = reg.match(torch.from_numpy(make_key(2))[None])
    assert isinstance(out, torch.Tensor) and out.tolist() == [b]


def test_match_takes_a_wider_threshold_when_asked(reg):
    a = add(reg, 1)
    farther = near(make_key(1), scale=0.6)  # beyond the registry's 0.05, within 0.5
    dist, _ = reg.nearest(farther[None])
    assert reg.config.threshold < dist[0] < 0.5
    assert reg.match(farther[None]).tolist() == [-1]
    assert reg.match(farther[None], threshold=0.5).tolist() == [a]


def test_invalid_transitions_and_unknown_ids(reg):
    old = add(reg, 1)
    new = add(reg, 2, key=near(make_key(1)))
    with pytest.raises(InvalidTransition, match=f"edit {new} is already active"):
        reg.restore(new)
    with pytest.raises(InvalidTransition, match=f"edit {old} is superseded by edit {new}"):
        reg.restore(old)
    reg.rollback(new)
    with pytest.raises(InvalidTransition, match=f"^edit {new} is already rolled back$"):
        reg.rollback(new)
    for call in (reg.get, reg.rollback, reg.restore, reg.keys, reg.adapter):
        with pytest.raises(EditNotFound, match="^no edit with id 12$"):
            call(12)
    with pytest.raises(ValidationError, match="edit id must be an integer"):
        reg.get("3")
    assert reg.generation == 3  # failed writes logged nothing


def test_add_validates_key_and_adapter(reg):
    adapter = make_adapter(reg.config)
    with pytest.raises(ValidationError, match=r"keys must have shape \(16,\) or \(n, 16\) with 1 <= n <= 64, got \(5,\)"):
        reg.add("p", "t", np.zeros(5), adapter)
    with pytest.raises(ValidationError, match="NaN"):
        reg.add("p", "t", np.full(16, np.nan), adapter)
    adapter["0.A"] = adapter["0.A"][:, :5]
    with pytest.raises(ValidationError, match="'0.A' has shape"):
        reg.add("p", "t", make_key(1), adapter)
    with pytest.raises(ValidationError, match="info"):
        reg.add("p", "t", make_key(1), make_adapter(reg.config), {"loss": float("nan")})
    assert reg.count() == 0 and reg.generation == 0


def test_read_only_registry_refuses_writes(tmp_path, config):
    with EditRegistry.create(tmp_path / "r", config) as reg:
        add(reg, 1)
    with EditRegistry.open(tmp_path / "r", readonly=True) as reg:
        assert reg.readonly and reg.count() == 1 and reg.match(make_key(1)[None]).tolist() == [1]
        for write in (lambda: add(reg, 2), lambda: reg.rollback(1), lambda: reg.restore(1),
                      lambda: reg.add_many([]), lambda: reg.import_(tmp_path / "b")):
            with pytest.raises(ReadOnlyError, match=f"registry at .* is open read-only"):
                write()


def test_reopen_persists_everything(tmp_path, config):
    with EditRegistry.create(tmp_path / "r", config) as reg:
        old = add(reg, 1, loss=0.25)
        new = add(reg, 2, key=near(make_key(1)))
        add(reg, 3)
        reg.rollback(3)
        before = list(reg.records())
    with EditRegistry.open(tmp_path / "r") as reg:
        assert list(reg.records()) == before
        assert reg.config == config and reg.generation == 4
        assert reg.count("superseded") == reg.count("rolled_back") == reg.count("active") == 1
        assert reg.match(np.stack([make_key(1), make_key(3)])).tolist() == [new, -1]
        assert add(reg, 4) == 4  # ids continue
        assert reg.get(old).info == {"loss": 0.25}


def test_create_and_open_errors(tmp_path, config):
    EditRegistry.create(tmp_path / "r", config).close()
    assert EditRegistry.exists(tmp_path / "r") and not EditRegistry.exists(tmp_path / "nope")
    with pytest.raises(RegistryError, match="already exists"):
        EditRegistry.create(tmp_path / "r", config)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SchemaError, match="is a file"):
        EditRegistry.open(tmp_path / "file")
    with pytest.raises(SchemaError, match="is a file"):
        EditRegistry.create(tmp_path / "file", config)
    with pytest.raises(SchemaError, match="no registry at .*nope"):
        EditRegistry.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SchemaError, match="empty is not a registry"):
        EditRegistry.open(tmp_path / "empty")


def test_unknown_schema_version_is_refused(tmp_path, config):
    EditRegistry.create(tmp_path / "r", config).close()
    store = Store(tmp_path / "r")
    store.write(lambda txn: txn.put("meta", "schema_version", b"7"))
    store.close()
    with pytest.raises(SchemaError, match=r"^registry schema version 7 is not supported by this version \(expects 3\)$"):
        EditRegistry.open(tmp_path / "r")


def test_add_many_resolves_conflicts_within_and_across_batches(reg):
    first = add(reg, 1)
    items = [{"prompt": f"p{i}", "target": "t", "keys": make_key(100 + i), "adapter": make_adapter(reg.config, i)}
             for i in range(7)]
    items[2]["keys"] = near(make_key(1))           # supersedes the committed edit
    items[5]["keys"] = near(make_key(100 + 3))     # supersedes item 3 (earlier batch)
    items[6]["keys"] = near(make_key(1), seed=7)   # supersedes item 2 (same batch)
    ids = reg.add_many(items, batch_size=3)
    assert ids == list(range(2, 9))
    assert reg.get(first).superseded_by == ids[2]
    assert reg.get(ids[3]).superseded_by == ids[5]
    assert reg.get(ids[2]).superseded_by == ids[6] and reg.get(ids[6]).supersedes == ids[2]
    assert reg.count("active") == 5 and reg.count("superseded") == 3
    assert reg.generation == 1 + 3  # one event per batch
    assert reg.match(make_key(1)[None]).tolist() == [ids[6]]
    assert reg.verify().ok


def test_add_many_without_conflict_checks_does_not_build_the_index(reg):
    items = ({"prompt": "p", "target": "t", "keys": make_key(i), "adapter": make_adapter(reg.config, i),
              "info": {"n": i}} for i in range(2500))
    ids = reg.add_many(items, check_conflicts=False)
    assert ids == list(range(1, 2501)) and reg.key_index is None
    assert reg.count("active") == 2500 and reg.get(2500).info == {"n": 2499}
    queries = np.stack([make_key(i) for i in (0, 1234, 2499)])
    assert reg.match(queries).tolist() == [1, 1235, 2500]


def test_adapter_cache_loads_through_the_registry(reg):
    ids = [add(reg, seed) for seed in range(3)]
    cache = AdapterCache(reg.config.layers, reg.config.rank, 4, reg.adapters)
    slots = cache.slots(ids)
    A, _ = cache.tensors(1)
    assert torch.equal(A[slots[2]], make_adapter(reg.config, 2)["1.A"])


def test_stats_are_json_safe(reg):
    import json

    add(reg, 1)
    stats = json.loads(json.dumps(reg.stats()))
    assert stats["active"] == stats["total"] == 1 and stats["generation"] == 1
    assert stats["adapter_bytes"] == 2 * 4 * (2 * 12 + 10 * 2) and stats["schema_version"] == 3
    assert stats["disk_bytes"] > 0 and stats["map_size"] >= stats["disk_bytes"]
    assert stats["layers"][0] == {"name": "mlp.0", "in_features": 12, "out_features": 10}
