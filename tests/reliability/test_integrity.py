"""Integrity: `sola verify` finds each kind of damage and names the edit; a corrupt edit is never applied
(its rows get the base output and a warning is logged); `verify --repair` rebuilds without losing edits."""
from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import safetensors.numpy
import torch
from reliability_helpers import damage, invoke, tamper

from registry import EditRegistry
from registry.codec import adapter_shapes
from sola_core import EditConfig, SolaEditor
from sola_core.models import load_model


def flip(value: bytes) -> bytes:
    """One bit of the first byte: for a key, the lowest mantissa bit of its first value (it still routes)."""
    return bytes([value[0] ^ 0x01]) + value[1:]


def restamp(path: str, edit_id: int, what: str, data: bytes) -> None:
    """Store new bytes for an edit's key/adapter AND a matching checksum: damage a checksum cannot see."""
    tamper(path, what + "s", edit_id, lambda _: data)
    field = f"{what}_sha256"
    tamper(path, "records", edit_id,
           lambda rec: json.dumps({**json.loads(rec), field: hashlib.sha256(data).hexdigest()}).encode())


def adapter_bytes(path: str, edit_id: int, dtype=np.float32, fill=None, drop_col=False) -> bytes:
    with EditRegistry.open(path, readonly=True) as reg:
        tensors = {name: t.numpy() for name, t in reg.adapter(edit_id).items()}
    if fill is not None:
        tensors["0.A"] = tensors["0.A"].copy()
        tensors["0.A"][0, 0] = fill
    if drop_col:
        tensors["0.A"] = np.ascontiguousarray(tensors["0.A"][:, :-1])
    return safetensors.numpy.save({name: t.astype(dtype) for name, t in tensors.items()})


def key_bytes(path: str, edit_id: int, fill: float) -> bytes:
    with EditRegistry.open(path, readonly=True) as reg:
        key = reg.keys(edit_id)[0].copy()
    key[3] = fill
    return key.astype("<f4").tobytes()


DAMAGE = {
    "adapter bit flip": (lambda p: tamper(p, "adapters", 1, flip), "edit 1 adapter does not match its checksum"),
    "adapter dtype": (lambda p: restamp(p, 1, "adapter", adapter_bytes(p, 1, np.float16)),
                      "edit 1 adapter tensor '0.A' has dtype torch.float16, expected torch.float32"),
    "adapter shape": (lambda p: restamp(p, 1, "adapter", adapter_bytes(p, 1, drop_col=True)),
                      "edit 1 adapter tensor '0.A' has shape (4, 127), expected (4, 128)"),
    "adapter NaN": (lambda p: restamp(p, 1, "adapter", adapter_bytes(p, 1, fill=np.nan)),
                    "edit 1 adapter tensor '0.A' contains NaN or infinite values"),
    "adapter missing": (lambda p: tamper(p, "adapters", 1, lambda v: None), "edit 1 has no stored adapter"),
    "key bit flip": (lambda p: tamper(p, "keys", 1, flip), "edit 1 key does not match its checksum"),
    "key truncated": (lambda p: tamper(p, "keys", 1, lambda v: v[:-4]), "edit 1 key has 508 bytes, expected a multiple of 512"),
    "key inf": (lambda p: restamp(p, 1, "key", key_bytes(p, 1, np.inf)), "edit 1 key contains NaN or infinite values"),
    "orphan adapter": (lambda p: tamper(p, "adapters", 77, lambda v: b"junk"),
                       "adapter stored for edit 77, which has no record"),
    "active set": (lambda p: tamper(p, "active", 1, lambda v: None), "edit 1 is active but missing from the active set"),
    "counters": (lambda p: tamper(p, "meta", "counts", lambda v: b'{"active": 5}'), "status counters are wrong"),
    "generation": (lambda p: tamper(p, "meta", "generation", lambda v: b"99"),
                   "meta: generation 99 has no log event, so other processes cannot replay it"),
    "next id": (lambda p: tamper(p, "meta", "next_id", lambda v: b"2"), "meta: next id 2 is not above the highest edit id 2"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_verify_names_the_damaged_edit_and_repair_keeps_every_edit(registry_copy, damage):
    corrupt, problem = DAMAGE[damage]
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        records = [(r.id, r.prompt, r.target) for r in reg.records()]
    corrupt(registry_copy)

    checked = invoke("verify", "--json", registry=registry_copy)
    assert checked.exit_code == 1
    report = json.loads(checked.stdout)
    assert not report["ok"] and any(problem in line for line in report["problems"]), report["problems"]

    repaired = invoke("verify", "--repair", "--json", registry=registry_copy)
    assert repaired.exit_code == 0, repaired.output
    assert invoke("verify", registry=registry_copy).exit_code == 0
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        assert [(r.id, r.prompt, r.target) for r in reg.records()] == records  # no edit lost
        if damage.startswith(("adapter", "key")):  # a corrupt edit is rolled back, marked, never deleted
            assert reg.get(1).status == "rolled_back" and reg.get(1).info["corrupt"].startswith("edit 1")


def test_verify_with_model_checks_the_fingerprint(registry_copy, model_dir, narrow_model_dir, retrained_model_dir):
    assert invoke("verify", "--with-model", registry=registry_copy, model=model_dir).exit_code == 0
    other = invoke("verify", "--with-model", "--json", registry=registry_copy, model=retrained_model_dir)
    assert other.exit_code == 1
    assert json.loads(other.stdout)["problems"] == [
        "meta: the model's fingerprint differs from the registry's in weights_sha256"]
    narrow = invoke("verify", "--with-model", "--json", registry=registry_copy, model=narrow_model_dir)
    assert narrow.exit_code == 1 and "hidden_size" in json.loads(narrow.stdout)["problems"][0]
    unrepairable = invoke("verify", "--repair", "--with-model", "--json", registry=registry_copy, model=retrained_model_dir)
    assert unrepairable.exit_code == 1  # repair cannot make a registry belong to another model
    assert json.loads(unrepairable.stdout)["remaining"] == [
        "meta: the model's fingerprint differs from the registry's in weights_sha256"]


PROMPTS = ["The capital of France is", "The largest planet is", "Water boils at", "Hello, how are you today?"]


def strong_adapter(reg: EditRegistry, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=gen) for name, shape in adapter_shapes(reg.config).items()}


def test_a_corrupt_edit_is_never_applied_its_row_gets_the_base_output(tmp_path, model_dir, caplog):
    """Three edits; the adapter of one and the key of another rot on disk. In one batch the healthy edit
    still applies, the two damaged rows are bit-identical to the unedited model, and each is logged."""
    model, tokenizer = load_model(model_dir)
    with SolaEditor.open(str(tmp_path / "reg"), model, tokenizer, config=EditConfig(key_source="layer", threshold=1e-4)) as editor:
        base = editor.logits(PROMPTS)
        reg = editor.registry
        ids = [reg.add(p, " x", editor.key(p), strong_adapter(reg, i)) for i, p in enumerate(PROMPTS[:3])]
        healthy = editor.logits(PROMPTS[:1])
        # damage through the open environment: bit rot, no generation bump
        damage(reg, lambda txn: txn.put("adapters", ids[1], flip(txn.get("adapters", ids[1]))))
        damage(reg, lambda txn: txn.put("keys", ids[2], flip(txn.get("keys", ids[2]))))

        with caplog.at_level(logging.WARNING):
            served = editor.logits(PROMPTS)
            routes = editor.route(PROMPTS)
    assert routes == [ids[0], None, None, None]
    assert torch.allclose(served[0], healthy[0], atol=1e-5) and not torch.allclose(served[0], base[0])
    for row in (1, 2, 3):
        assert torch.equal(served[row], base[row])  # the damaged edits were not applied
    warned = " ".join(record.getMessage() for record in caplog.records)
    assert f"edit {ids[1]} not applied" in warned and f"edit {ids[1]} adapter does not match its checksum" in warned
    assert f"edit {ids[2]} not applied" in warned and f"edit {ids[2]} key does not match its checksum" in warned


def test_an_unreadable_key_does_not_stop_serving_the_others(tmp_path, model_dir, caplog):
    model, tokenizer = load_model(model_dir)
    path = str(tmp_path / "reg")
    with SolaEditor.open(path, model, tokenizer, config=EditConfig(key_source="layer", threshold=1e-4)) as editor:
        base = editor.logits(PROMPTS[:2])
        reg = editor.registry
        ids = [reg.add(p, " x", editor.key(p), strong_adapter(reg, i)) for i, p in enumerate(PROMPTS[:2])]
        edited = editor.logits(PROMPTS[:1])
    tamper(path, "keys", ids[1], lambda v: v[:-4])  # the index is built from the store at next open
    model, tokenizer = load_model(model_dir)
    with caplog.at_level(logging.WARNING), SolaEditor.open(path, model, tokenizer) as editor:
        served = editor.logits(PROMPTS[:2])
        assert editor.route(PROMPTS[:2]) == [ids[0], None]
    assert torch.allclose(served[0], edited[0], atol=1e-5) and torch.equal(served[1], base[1])
    assert f"edit {ids[1]} is not served: edit {ids[1]} key has 508 bytes" in caplog.text
