"""Integrity checks over a whole registry, and the repair of what can be rebuilt.

``check`` reads everything in one read transaction so counters and records are compared on
one consistent snapshot. ``repair`` runs inside a write transaction: it rolls corrupt edits
back (never deletes them), drops keys and adapters that belong to no record, and rebuilds the
derived data (counters, active set, next id); the caller's index is rebuilt from the store afterwards.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .codec import SCHEMA_VERSION, decode_adapter, decode_json, decode_keys
from .errors import CorruptEdit
from .meta import get_meta
from .store import Txn
from .transaction import Transaction
from .types import ACTIVE, ROLLED_BACK, STATUSES, SUPERSEDED, Record, RegistryConfig, VerifyReport, is_tombstone

if TYPE_CHECKING:
    from .index import KeyIndex


def check(txn: Txn, config: RegistryConfig, index: KeyIndex | None, tombstones: KeyIndex | None = None,
          fingerprint: dict | None = None) -> tuple[VerifyReport, dict[int, str]]:
    """All problems found, and the corrupt edits (id -> reason) that repair should roll back.

    ``fingerprint``, when given, is the model's: it must equal the one the registry was made for.
    """
    problems: list[str] = _meta_problems(txn, config) + _fingerprint_problems(config, fingerprint)
    corrupt: dict[int, str] = {}
    counted: Counter = Counter()
    active: set[int] = set()
    entombed: set[int] = set()
    checked = last_id = 0
    for edit_id, data in txn.items("records"):
        checked, last_id = checked + 1, edit_id
        try:
            rec = Record.from_dict(decode_json(data))
        except (ValueError, TypeError) as exc:
            problems.append(f"edit {edit_id}: record is unreadable: {exc}")
            continue
        counted[rec.status] += 1
        if rec.status == ACTIVE:
            active.add(edit_id)
        elif is_tombstone(rec.to_dict()):
            entombed.add(edit_id)
        problems += _record_problems(txn, rec, edit_id)
        reason = _tensor_problem(txn, config, rec)
        if reason:
            problems.append(reason)
            corrupt[edit_id] = reason
    problems += _derived_problems(txn, counted, active, index)
    problems += _set_problems(txn, "tombstones", "a tombstone", entombed, tombstones)
    problems += _orphans(txn) + _log_problems(txn, last_id)
    return VerifyReport(ok=not problems, checked=checked, problems=problems), corrupt


def _meta_problems(txn: Txn, config: RegistryConfig) -> list[str]:
    problems = []
    if get_meta(txn, "schema_version") != SCHEMA_VERSION:
        problems.append("meta: schema version is missing or wrong")
    if get_meta(txn, "config") != config.to_dict():
        problems.append("meta: stored config differs from the one this registry was opened with")
    return problems


def _fingerprint_problems(config: RegistryConfig, fingerprint: dict | None) -> list[str]:
    if fingerprint is None or fingerprint == config.fingerprint:
        return []
    fields = sorted(name for name in set(fingerprint) | set(config.fingerprint)
                    if fingerprint.get(name) != config.fingerprint.get(name))
    return [f"meta: the model's fingerprint differs from the registry's in {', '.join(fields)}"]


def _orphans(txn: Txn) -> list[str]:
    """Keys and adapters that belong to no record (an edit is stored whole or not at all)."""
    return [f"{what} stored for edit {edit_id}, which has no record"
            for db, what in (("keys", "key"), ("adapters", "adapter"))
            for edit_id in orphan_ids(txn, db)]


def orphan_ids(txn: Txn, db: str) -> list[int]:
    return [edit_id for edit_id in txn.ids(db) if txn.get("records", edit_id) is None]


def _log_problems(txn: Txn, last_id: int) -> list[str]:
    """Readers replay the log up to the generation, and new ids must never reuse old ones."""
    problems = []
    generation, next_id = get_meta(txn, "generation"), get_meta(txn, "next_id")
    if not isinstance(generation, int) or generation < 0:
        problems.append(f"meta: generation {generation!r} is not a count of writes")
    elif generation > 0 and next(txn.ids("log", generation), None) != generation:
        problems.append(f"meta: generation {generation} has no log event, so other processes cannot replay it")
    if not isinstance(next_id, int) or next_id <= last_id:
        problems.append(f"meta: next id {next_id!r} is not above the highest edit id {last_id}")
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
    """Why an edit that may serve (active or superseded) has a bad key or adapter, or a tombstone a bad key; None
    when all is well."""
    if rec.status == ROLLED_BACK and txn.get("tombstones", rec.id) is None:
        return None  # out of service and shielding nothing: its key and adapter are never read
    tombstone = rec.status == ROLLED_BACK
    try:
        keys = decode_keys(txn.get("keys", rec.id), config.key_dim, rec.id, rec.key_sha256)
        if len(keys) != 1 + len(rec.paraphrases):
            return f"edit {rec.id} has {len(keys)} keys for {1 + len(rec.paraphrases)} phrasings"
        if not tombstone:
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
    return problems + _set_problems(txn, "active", "active", active, index)


def _set_problems(txn: Txn, db: str, what: str, expected: set[int], index: KeyIndex | None) -> list[str]:
    """A stored id set (``active``, ``tombstones``) and its in-memory index against the records."""
    listed = set(txn.ids(db))
    problems = [f"edit {i} is {what} but missing from the {db} set" for i in sorted(expected - listed)]
    problems += [f"edit {i} is in the {db} set but not {what}" for i in sorted(listed - expected)]
    if index is not None:
        indexed = set(index.ids().tolist())
        problems += [f"edit {i} is {what} but missing from the {db} index" for i in sorted(expected - indexed)]
        problems += [f"edit {i} is in the {db} index but not {what}" for i in sorted(indexed - expected)]
    return problems


def repair(tx: Transaction, corrupt: dict[int, str]) -> list[str]:
    """Roll back corrupt edits (marking why) and rebuild counters and the active set."""
    repaired = []
    keep_inactive = frozenset(corrupt)
    for edit_id, reason in corrupt.items():
        rec = tx.record(edit_id)
        if rec.status != ROLLED_BACK:
            rec = tx.rollback(edit_id, keep_inactive)
            repaired.append(f"edit {edit_id} rolled back: {reason}")
        else:
            tx.unentomb(edit_id)
            repaired.append(f"edit {edit_id} is no longer a tombstone: {reason}")
        rec.info["corrupt"] = reason
        tx.save(rec)
    for db in ("keys", "adapters"):
        for edit_id in orphan_ids(tx.txn, db):
            tx.txn.delete(db, edit_id)
            repaired.append(f"{db[:-1]} of edit {edit_id}, which has no record, removed")
    counts = tx.recount()
    repaired.append(f"status counters and active set rebuilt: {counts}")
    repaired.append("search index dropped; it is rebuilt from the store on next use")
    return repaired
