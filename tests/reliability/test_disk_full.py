"""Disk: a full memory map or a full disk is one clear error; the registry stays consistent and usable."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from reliability_helpers import assert_one_error_line, check_consistent, make_bundle, run_cli_in

from registry import EditRegistry, LayerSpec, RegistryConfig, RegistryError

BIG = RegistryConfig(key_dim=16, layers=[LayerSpec("big", 1024, 1024)], rank=16, alpha=16.0, metric="cosine",
                     threshold=0.01, key_source="layer", fingerprint={"model": "big"})  # 128 KiB per adapter


def batch(rng: np.random.Generator, n: int) -> list[dict]:
    return [{"prompt": f"fact {rng.integers(1 << 30)}", "target": " x",
             "keys": rng.standard_normal(16).astype(np.float32),
             "adapter": {"0.A": torch.from_numpy(rng.standard_normal((16, 1024)).astype(np.float32)),
                         "0.B": torch.from_numpy(rng.standard_normal((1024, 16)).astype(np.float32))}}
            for _ in range(n)]


def test_a_full_map_is_a_clear_error_and_leaves_a_consistent_registry(tmp_path):
    rng, path, added = np.random.default_rng(0), str(tmp_path / "reg"), []
    with EditRegistry.create(path, BIG, max_map_size=4 << 20) as reg:
        with pytest.raises(RegistryError, match=r"^registry is full: its map size of \d+ bytes cannot double past 4194304"):
            for _ in range(10):
                added += reg.add_many(batch(rng, 5))
        assert 0 < len(added) < 50 and reg.count() == len(added)  # the batch that did not fit left nothing
        assert reg.generation == len(added) // 5
        assert reg.match(np.stack([reg.keys(i)[0] for i in added])).tolist() == added
    check_consistent(path)
    with EditRegistry.open(path, max_map_size=64 << 20) as reg:  # a bigger limit: it grows and goes on
        more = reg.add_many(batch(rng, 10))
        assert reg.count() == len(added) + 10 and more[0] == added[-1] + 1
    check_consistent(path)


def test_a_full_disk_is_a_clear_error_and_leaves_a_consistent_registry(registry_copy, tmp_path):
    """A 1 MiB tmpfs, mounted in a private mount namespace, holds the registry; a 2 MB import cannot fit."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("mount namespaces are not available here")
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        records = [(r.id, r.status) for r in reg.records()]
        bundle = make_bundle(reg, str(tmp_path / "big.safetensors"), 600, seed=1)
    mnt, after = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    small = f"{mnt}/reg"
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && cp -a {registry_copy} {small} && \"$@\"; "
              f"rc=$?; cp -a {small} {after}; exit $rc")
    base = ["--registry", small]
    results = run_cli_in([[*base, "import", bundle], [*base, "list", "--json"], [*base, "verify"],
                          [*base, "rollback", "1"], [*base, "verify"]], ["unshare", "-m", "sh", "-c", script, "sh"])

    assert results[0]["exit_code"] == 1 and results[0]["stdout"] == ""
    assert_one_error_line(results[0]["stderr"], "could not write to the registry at")
    assert "(is the disk full?); nothing was written" in results[0]["stderr"]
    assert [r["exit_code"] for r in results[1:]] == [0, 0, 0, 0], results  # still readable, verifiable, writable
    with EditRegistry.open(str(after), readonly=True) as reg:
        assert [(r.id, r.status) for r in reg.records()] == [(1, "rolled_back")] + records[1:]
    check_consistent(str(after))
