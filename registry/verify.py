"""Integrity checks over a whole registry, and the repair of what can be rebuilt.

``check`` reads everything in one read transaction so counters and records are compared on
one consistent snapshot. ``repair`` runs inside a write transaction: it rolls corrupt edits
back (never deletes them) and rebuilds the derived data (counters, active set); the caller's
index is rebuilt from the store afterwards.
"""
from __future__ import annotations

from collections import Counter

from .codec import SCHEMA_VERSION, decode_adapter, decode_json, decode_key
from .errors import CorruptEdit
from .index import KeyIndex
from .store import Txn
from .transaction import Transaction, get_meta
from .types import ACTIVE, ROLLED_BACK, STATUSES, SUPERSEDED, Record, RegistryConfig, VerifyReport


def check(txn: Txn, config: RegistryConfig, index: KeyIndex | None) -> tuple[VerifyReport, dict[int, str]]:
    """All problems found, and the corrupt edits (id -> reason) that repair should roll back."""
    problems: list[str] = _meta_problems(txn, config)
    corrupt: dict[int, str] = {}
    counted: Counter = Counter()
    active: set[int] = set()
    checked = 0
    for edit_id, data in txn.items("records"):
        checked += 1
        try:
            rec = Record.from_dict(decode_json(data))
        except (ValueError, TypeError) as exc:
            problems.append(f"edit {edit_id}: record is unreadable: {exc}")
            continue
        counted[rec.status] += 1
        if rec.status == ACTIVE:
            active.add(edit_id)
        problems += _record_problems(txn, rec, edit_id)
        reason = _tensor_problem(txn, config, rec)
        if reason:
            problems.append(reason)
            corrupt[edit_id] = reason
    problems += _derived_problems(txn, counted, active, index)
    return VerifyReport(ok=not problems, checked=checked, problems=problems), corrupt


def _meta_problems(txn: Txn, config: RegistryConfig) -> list[str]:
    problems = []
    if get_meta(txn, "schema_version") != SCHEMA_VERSION:
        problems.append("meta: schema version is missing or wrong")
    if get_meta(txn, "config") != config.to_dict():
        problems.append("meta: stored config differs from the one this registry was opened with")
    return problems


def _record_problems(txn: Txn, rec: Record, edit_id: int) -> list[str]:
    """Status and version links that contradict each other or point at nothing."""
    problems = []
    if rec.id != edit_id:
        problems.append(f"edit {edit_id}: record says it is edit {rec.id}")
    if rec.status not in STATUSES:
        problems.append(f"edit {edit_id} has unknown status {rec.status!r}")
    if rec.status == ACTIVE and rec.superseded_by is not None:
        problems.append(f"edit {edit_id} is active but marked superseded by edit {rec.superseded_by}")
    if rec.status == SUPERSEDED and rec.superseded_by is None:
        problems.append(f"edit {edit_id} is superseded but names no newer edit")
    for relation, other in (("supersedes", rec.supersedes), ("is superseded by", rec.superseded_by)):
        if other is not None and txn.get("records", other) is None:
            problems.append(f"edit {edit_id} {relation} edit {other}, which does not exist")
    return problems


def _tensor_problem(txn: Txn, config: RegistryConfig, rec: Record) -> str | None:
    """Why an edit that may serve (active or superseded) has a bad key or adapter, or None."""
    if rec.status == ROLLED_BACK:
        return None
    try:
        decode_key(txn.get("keys", rec.id), config.key_dim, rec.id, rec.key_sha256)
        decode_adapter(txn.get("adapters", rec.id), config, rec.id, rec.adapter_sha256)
    except CorruptEdit as exc:
        return str(exc)
    return None


def _derived_problems(txn: Txn, counted: Counter, active: set[int], index: KeyIndex | None) -> list[str]:
    """Counters, the active set and the in-memory index against what the records say."""
    problems = []
    stored = get_meta(txn, "counts") or {}
    if any(stored.get(status, 0) != counted[status] for status in STATUSES):
        problems.append(f"status counters are wrong: stored {stored}, counted {dict(counted)}")
    listed = set(txn.ids("active"))
    problems += [f"edit {i} is active but missing from the active set" for i in sorted(active - listed)]
    problems += [f"edit {i} is in the active set but not active" for i in sorted(listed - active)]
    if index is not None:
        indexed = set(index.ids().tolist())
        problems += [f"edit {i} is active but missing from the search index" for i in sorted(active - indexed)]
        problems += [f"edit {i} is in the search index but not active" for i in sorted(indexed - active)]
    return problems


def repair(tx: Transaction, corrupt: dict[int, str]) -> list[str]:
    """Roll back corrupt edits (marking why) and rebuild counters and the active set."""
    repaired = []
    keep_inactive = frozenset(corrupt)
    for edit_id, reason in corrupt.items():
        rec = tx.record(edit_id)
        if rec.status != ROLLED_BACK:
            rec = tx.rollback(edit_id, keep_inactive)
            rec.info["corrupt"] = reason
            tx.save(rec)
            repaired.append(f"edit {edit_id} rolled back: {reason}")
    counts = tx.recount()
    repaired.append(f"status counters and active set rebuilt: {counts}")
    repaired.append("search index dropped; it is rebuilt from the store on next use")
    return repaired
