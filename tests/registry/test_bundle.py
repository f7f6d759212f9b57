"""Export/import bundles: round trip, conflicts on import, and refusal of foreign or bad bundles."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from registry_helpers import make_adapter, make_config, make_key, near

from registry import BundleError, EditRegistry


@pytest.fixture
def source(tmp_path, config):
    """A registry with edits 1 (superseded by 2), 2 and 3 (active) and 4 (rolled back)."""
    with EditRegistry.create(tmp_path / "src", config) as reg:
        for seed, key in [(1, make_key(1)), (2, near(make_key(1))), (3, make_key(3)), (4, make_key(4))]:
            reg.add(f"p{seed}", f"t{seed}", key, make_adapter(config, seed), {"steps": seed})
        reg.rollback(4)
        yield reg


def test_round_trip_of_active_edits(source, tmp_path, config):
    assert source.export(tmp_path / "b.safetensors") == 2
    with EditRegistry.create(tmp_path / "dst", config) as dst:
        dst.add("other", "x", make_key(9), make_adapter(config, 9))
        ids = dst.import_(tmp_path / "b.safetensors")
        assert ids == [2, 3] and dst.generation == 2  # one transaction for the whole bundle
        rec = dst.get(2)
        assert (rec.prompt, rec.target, rec.status) == ("p2", "t2", "active")
        assert rec.info == {"steps": 2, "imported_from_id": 2}
        np.testing.assert_array_equal(dst.keys(3)[0], make_key(3))
        for name, tensor in make_adapter(config, 3).items():
            assert torch.equal(dst.adapter(3)[name], tensor)
        assert dst.match(np.stack([make_key(1), make_key(3)])).tolist() == [2, 3]
        assert dst.verify().ok


def test_export_by_status_and_conflicting_import(source, tmp_path):
    assert source.export(tmp_path / "all.safetensors", status=None) == 4
    assert source.export(tmp_path / "rb.safetensors", status="rolled_back") == 1
    ids = source.import_(tmp_path / "all.safetensors")  # same keys again: each supersedes its twin
    assert ids == [5, 6, 7, 8]
    assert source.get(2).superseded_by == 5 and source.get(3).superseded_by == 7
    assert source.get(5).superseded_by == 6  # bundle order: the later version wins
    assert source.get(8).status == "active"  # the copy of rolled-back edit 4 meets no conflict
    assert source.count("active") == 3 and source.verify().ok


def test_bundle_from_another_model_is_refused_and_writes_nothing(source, tmp_path):
    source.export(tmp_path / "b.safetensors")
    for field, value in [("fingerprint", {"model": "other"}), ("rank", 3), ("key_dim", 8)]:
        with EditRegistry.create(tmp_path / field, make_config(**{field: value})) as other:
            with pytest.raises(BundleError, match=f"another model or setup: its {field} differs"):
                other.import_(tmp_path / "b.safetensors")
            assert other.count() == 0 and other.generation == 0


def write_bundle(path, tensors, manifest_obj=None, **metadata):
    metadata.setdefault("sola_bundle", "1")
    if manifest_obj is not None:
        metadata["manifest"] = json.dumps(manifest_obj)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_bad_bundles_are_refused_with_a_clear_message(source, tmp_path):
    source.export(tmp_path / "good.safetensors")
    with safetensors.safe_open(str(tmp_path / "good.safetensors"), "pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    (tmp_path / "junk").write_bytes(b"not safetensors at all")
    nan_tensors = {**tensors, "1.key": torch.full_like(tensors["1.key"], float("nan"))}
    write_bundle(tmp_path / "nan", nan_tensors, manifest)
    write_bundle(tmp_path / "short", {k: v for k, v in tensors.items() if k != "0.1.B"}, manifest)
    write_bundle(tmp_path / "plain", tensors, sola_bundle="0")
    write_bundle(tmp_path / "badjson", tensors, None, manifest="{oops")
    shape = {**tensors, "0.0.A": torch.zeros(2, 11)}
    write_bundle(tmp_path / "shape", shape, manifest)
    cases = {
        "missing": "no bundle at",
        "junk": "is not a readable SoLA bundle",
        "plain": "is not a SoLA bundle",
        "badjson": "has a bad manifest",
        "nan": "bundle edit 1: key contains NaN",
        "short": r"bundle tensors do not match its manifest \(e.g. 0.1.B\)",
        "shape": r"bundle edit 0 adapter tensor '0.A' has shape \(2, 11\), expected \(2, 12\)",
    }
    before = source.generation
    for name, message in cases.items():
        with pytest.raises(BundleError, match=message):
            source.import_(tmp_path / name)
    assert source.generation == before and source.count() == 4
