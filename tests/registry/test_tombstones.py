"""Rolled-back keys stay as tombstones: a rollback gives the inputs an edit took over back to the base model,
not to a neighbouring edit that happens to lie within the threshold."""
import numpy as np
import pytest
import torch
from registry_helpers import damage, make_adapter, make_config, make_key, near

from registry import EditRegistry
from registry.codec import SCHEMA_VERSION
from registry.meta import put_meta


def add(reg, seed, key=None):
    return reg.add(f"p{seed}", f"t{seed}", make_key(seed) if key is None else key, make_adapter(reg.config, seed))


def neighbours(tmp_path, backend="faiss"):
    """Two active edits whose keys route to each other (threshold 0.3, 0.05 apart), supersede only within 1e-3."""
    reg = EditRegistry.create(tmp_path / "r", make_config(threshold=0.3, supersede_within=1e-3), backend=backend)
    close = near(make_key(1), scale=0.05)
    return reg, add(reg, 1), add(reg, 2, key=close), close


def test_a_rolled_back_edit_does_not_hand_its_prompt_to_a_neighbour(tmp_path):
    reg, first, second, close = neighbours(tmp_path)
    with reg:
        assert reg.nearest(make_key(1)[None])[0][0] < 0.3  # ... so without tombstones it would route there
        reg.rollback(first)
        assert reg.match(np.stack([make_key(1), close])).tolist() == [-1, second]
        assert reg.verify().ok


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_torch_queries_meet_tombstones_too(tmp_path, backend):
    reg, first, second, close = neighbours(tmp_path, backend)
    with reg:
        reg.rollback(first)
        routed = reg.match(torch.from_numpy(np.stack([make_key(1), close, make_key(3)])))
        assert isinstance(routed, torch.Tensor) and routed.tolist() == [-1, second, -1]


def test_tombstones_survive_reopen_and_reach_other_instances(tmp_path):
    reg, first, second, close = neighbours(tmp_path)
    with reg, EditRegistry.open(reg.path) as other:
        assert other.match(make_key(1)[None]).tolist() == [first]  # indexes built before the rollback
        reg.rollback(first)
        other.refresh()  # replayed from the log
        assert other.match(np.stack([make_key(1), close])).tolist() == [-1, second]
    with EditRegistry.open(tmp_path / "r", readonly=True) as cold:
        assert cold.match(np.stack([make_key(1), close])).tolist() == [-1, second]
        assert cold.verify().ok


def test_restore_lifts_the_tombstone(tmp_path):
    reg, first, second, close = neighbours(tmp_path)
    with reg:
        reg.rollback(first)
        reg.restore(first)
        assert reg.match(np.stack([make_key(1), close])).tolist() == [first, second]
        assert reg.verify().ok


def test_a_tombstone_never_shadows_the_version_it_brought_back_or_a_re_edit(reg):
    old = add(reg, 1)
    new = add(reg, 2, key=near(make_key(1)))
    reg.rollback(new)  # the old version comes back, its key within the supersede distance of the tombstone
    probes = np.stack([make_key(1), near(make_key(1)), near(make_key(1), seed=5, scale=0.05)])
    assert reg.match(probes).tolist() == [old, old, old]
    reg.rollback(old)
    again = add(reg, 3, key=near(make_key(1), seed=7))  # edited afresh after both were rolled back
    assert reg.match(probes).tolist() == [again] * 3
    assert reg.verify().ok


def test_an_edit_whose_key_is_corrupt_still_rolls_back_without_a_tombstone(tmp_path):
    reg, first, second, close = neighbours(tmp_path)
    with reg:
        damage(reg, lambda txn: txn.put("keys", first, b"\0" * 4 * reg.config.key_dim))  # fails its checksum
        rec = reg.rollback(first)
        assert rec.status == "rolled_back" and "checksum" in rec.info["corrupt"]
        assert reg.match(np.stack([make_key(1), close])).tolist() == [second, second]  # nothing shields its prompt
        assert reg.verify().ok


def test_verify_finds_and_repair_rebuilds_a_lost_tombstone(tmp_path):
    reg, first, _, _ = neighbours(tmp_path)
    with reg:
        reg.rollback(first)
        damage(reg, lambda txn: txn.delete("tombstones", first))
        report = reg.verify(repair=True)
        assert f"edit {first} is a tombstone but missing from the tombstones set" in report.problems
        assert reg.verify().ok and reg.match(make_key(1)[None]).tolist() == [-1]


def test_a_version_1_registry_is_upgraded_on_open(tmp_path):
    reg, first, second, close = neighbours(tmp_path)
    with reg:
        reg.rollback(first)

        def downgrade(txn):
            txn.drop("tombstones")
            put_meta(txn, "schema_version", 1)

        damage(reg, downgrade)
    with EditRegistry.open(tmp_path / "r") as upgraded:
        assert upgraded.stats()["schema_version"] == SCHEMA_VERSION
        assert upgraded.match(np.stack([make_key(1), close])).tolist() == [-1, second]
        assert upgraded.verify().ok
