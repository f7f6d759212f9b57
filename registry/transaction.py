"""One write transaction: new edits, status changes with their conflict resolution, counters
and the single log event that tells other processes what changed.

An edit has one key per phrasing of its fact (its prompt's first, then its paraphrases'); every operation
moves all of them together. A rolled-back edit's keys stay in the store as a *tombstone*: they keep the inputs
nearest to them on the base model, so a rollback does not hand them to a neighbouring edit
(``EditRegistry.match``).

A :class:`Transaction` lives only inside ``Store.write`` and may be re-run from scratch when
the map grows, so it changes nothing outside the LMDB transaction; the caller applies
:meth:`Transaction.finish`'s event to the in-memory index after the commit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .codec import as_keys, decode_json, decode_keys, encode_adapter, encode_json, sha256
from .errors import CorruptEdit, EditNotFound, InvalidTransition, ValidationError
from .meta import get_meta, put_meta
from .nearest import near_earlier, nearest_row, superseded
from .store import Txn
from .types import ACTIVE, ROLLED_BACK, STATUSES, SUPERSEDED, Record, RegistryConfig, check_edit_text, is_tombstone

if TYPE_CHECKING:
    from .index import KeyIndex


class Stale(Exception):
    """Another process wrote since this instance last refreshed; retry after refreshing."""


@dataclass
class NewEdit:
    """A validated, encoded edit ready to be written (encoding happens outside the txn)."""

    prompt: str
    target: str
    keys: np.ndarray  # (1 + len(paraphrases), dim): the prompt's key, then each paraphrase's
    key_bytes: bytes
    adapter_bytes: bytes
    info: dict
    paraphrases: list[str]
    subject: str | None = None

    @classmethod
    def checked(cls, config: RegistryConfig, prompt: str, target: str, keys: Any,
                adapter: dict, info: dict | None = None, paraphrases: Any = (), subject: str | None = None) -> NewEdit:
        """The edit refused (ValidationError) unless its text, keys, adapter and info can be stored as given."""
        paraphrases = check_edit_text(prompt, target, paraphrases, subject)
        info = {} if info is None else info
        if not isinstance(info, dict):
            raise ValidationError(f"info must be a dict, got {type(info).__name__}")
        try:
            encode_json(info)
        except ValidationError as exc:
            raise ValidationError(f"info: {exc}") from None
        keys = as_keys(keys, config.key_dim)
        if len(keys) != 1 + len(paraphrases):
            raise ValidationError(f"an edit with {len(paraphrases)} paraphrases needs {1 + len(paraphrases)} keys "
                                  f"(the prompt's, then each paraphrase's), got {len(keys)}")
        return cls(prompt, target, keys, keys.tobytes(), encode_adapter(adapter, config), info, paraphrases, subject)


class Transaction:
    """The changes of one write; ``index`` (committed active keys) is needed for conflict checks."""

    def __init__(self, txn: Txn, config: RegistryConfig, index: KeyIndex | None,
                 expected_generation: int | None = None):
        self.txn, self.config, self.index = txn, config, index
        self.time = time.time()
        self._generation = get_meta(txn, "generation")
        if expected_generation is not None and self._generation != expected_generation:
            raise Stale()
        self._next_id = get_meta(txn, "next_id")
        self._counts = {**dict.fromkeys(STATUSES, 0), **(get_meta(txn, "counts") or {})}
        self._initial: dict[int, bool] = {}  # id -> was active before this transaction
        self._final: dict[int, bool] = {}  # id -> is active now
        self._keys: dict[int, np.ndarray] = {}  # (n, dim) keys of ids activated here
        self._entombed: dict[int, np.ndarray] = {}  # (n, dim) keys of ids that became tombstones here
        self._pending = None if index is None else _pending_index(config)

    # --- records -------------------------------------------------------------------------
    def record(self, edit_id: int) -> Record:
        data = self.txn.get("records", edit_id)
        if data is None:
            raise EditNotFound(f"no edit with id {edit_id}")
        return Record.from_dict(decode_json(data))

    def save(self, rec: Record) -> None:
        self.txn.put("records", rec.id, encode_json(rec.to_dict()))

    def _stored_keys(self, rec: Record) -> np.ndarray:
        return decode_keys(self.txn.get("keys", rec.id), self.config.key_dim, rec.id, rec.key_sha256)

    def _set_status(self, rec: Record, status: str, keys: np.ndarray | None = None) -> None:
        self._initial.setdefault(rec.id, rec.status == ACTIVE)
        self._counts[rec.status] = self._counts.get(rec.status, 0) - 1
        self._counts[status] += 1
        if status == ACTIVE:
            self._mark_active(rec.id, keys if keys is not None else self._stored_keys(rec))
        elif rec.status == ACTIVE:
            self._mark_inactive(rec.id)
        if rec.status == ROLLED_BACK:
            self.unentomb(rec.id)
        rec.status, rec.updated = status, self.time
        self.save(rec)

    def _mark_active(self, edit_id: int, keys: np.ndarray) -> None:
        self.txn.put("active", edit_id, b"")
        self._final[edit_id] = True
        self._keys[edit_id] = keys
        if self._pending is not None:
            self._pending.add([edit_id] * len(keys), keys)

    def _mark_inactive(self, edit_id: int) -> None:
        self.txn.delete("active", edit_id)
        self._final[edit_id] = False
        self._keys.pop(edit_id, None)
        if self._pending is not None:
            self._pending.remove([edit_id])

    def _entomb(self, rec: Record) -> None:
        try:
            keys = self._stored_keys(rec)
        except CorruptEdit as exc:  # rolled back all the same: rollback is how a bad edit is taken out
            rec.info["corrupt"] = str(exc)  # an unreadable key shields nothing (see is_tombstone)
            self.save(rec)
            return
        self.txn.put("tombstones", rec.id, b"")
        self._entombed[rec.id] = keys

    def unentomb(self, edit_id: int) -> bool:
        """Stop keeping a rolled-back edit's key as a tombstone; False if it was none."""
        self._entombed.pop(edit_id, None)
        if self.txn.get("tombstones", edit_id) is None:
            return False
        self.txn.delete("tombstones", edit_id)
        return True

    # --- conflicts -----------------------------------------------------------------------
    def _conflict(self, keys: np.ndarray, hint: tuple[float, int] | None = None, pending: bool = True) -> int | None:
        """The active edit a new or restored one with ``keys`` supersedes (nearest.superseded), counting this
        transaction's changes (``pending=False``: none of its keys lies near); never one without the index (a
        write that checks no conflicts)."""
        if self.index is None:
            return None
        return superseded(keys, self.config.supersede_distance, self.index, self._pending if pending else None,
                          self._final, hint)

    def _supersede(self, old_id: int, new_id: int) -> None:
        old = self.record(old_id)
        old.superseded_by = new_id
        self._set_status(old, SUPERSEDED)

    # --- operations ----------------------------------------------------------------------
    def insert(self, edit: NewEdit, hint: tuple[float, int] | None = None, pending: bool = True) -> int:
        """Write a new active edit; the nearest active edit within the supersede distance is superseded."""
        new_id = self._next_id
        self._next_id += 1
        old_id = self._conflict(edit.keys, hint, pending)
        if old_id is not None:
            self._supersede(old_id, new_id)
        rec = Record(new_id, edit.prompt, edit.target, ACTIVE, self.time, self.time, old_id, None,
                     sha256(edit.key_bytes), sha256(edit.adapter_bytes), edit.info, edit.paraphrases, edit.subject)
        self.txn.put("keys", new_id, edit.key_bytes)
        self.txn.put("adapters", new_id, edit.adapter_bytes)
        self._initial[new_id] = False
        self._counts[ACTIVE] += 1
        self._mark_active(new_id, edit.keys)
        self.save(rec)
        return new_id

    def insert_many(self, edits: list[NewEdit]) -> list[int]:
        """Insert in order. The committed index is searched once for the whole batch, and the batch's keys once
        among themselves: an edit searches the keys this transaction activated only if an earlier one lies near."""
        hints: list = [None] * len(edits)
        near = set(range(len(edits)))
        if self.index is not None and edits:
            dists, ids = self.index.search(np.concatenate([edit.keys for edit in edits]), 1)
            ends = np.cumsum([len(edit.keys) for edit in edits]).tolist()
            hints = [nearest_row((dists[start:end], ids[start:end])) for start, end in zip([0] + ends, ends)]
            if not len(self._pending):  # nothing else activated in this transaction
                near = near_earlier([edit.keys for edit in edits], self.config.supersede_distance, self.config.metric)
        return [self.insert(edit, hint, i in near) for i, (edit, hint) in enumerate(zip(edits, hints))]

    def rollback(self, edit_id: int, keep_inactive: frozenset[int] = frozenset()) -> Record:
        """Take an edit out of service and keep its key as a tombstone; if it was active, its previous version
        comes back. ``keep_inactive`` (repair: corrupt edits) stay out of service and get no tombstone."""
        rec = self.record(edit_id)
        if rec.status == ROLLED_BACK:
            raise InvalidTransition(f"edit {edit_id} is already rolled back")
        was_active = rec.status == ACTIVE
        self._set_status(rec, ROLLED_BACK)
        if edit_id not in keep_inactive:
            self._entomb(rec)
        if was_active:
            self._reactivate_previous(rec, keep_inactive)
        return rec

    def _reactivate_previous(self, rec: Record, keep_inactive: frozenset[int]) -> None:
        """Walk back the ``supersedes`` chain past rolled-back versions to the one it replaced."""
        link, seen = rec, {rec.id}
        while link.supersedes is not None and link.supersedes not in seen:
            try:
                prev = self.record(link.supersedes)
            except EditNotFound:
                return
            seen.add(prev.id)
            if prev.superseded_by != link.id or prev.id in keep_inactive:
                return
            if prev.status == SUPERSEDED:
                prev.superseded_by = None
                self._set_status(prev, ACTIVE)
                return
            if prev.status != ROLLED_BACK:
                return
            link = prev

    def restore(self, edit_id: int) -> Record:
        """Put a rolled-back edit back in service, resolving conflicts as ``insert`` does."""
        rec = self.record(edit_id)
        if rec.status == ACTIVE:
            raise InvalidTransition(f"edit {edit_id} is already active")
        if rec.status == SUPERSEDED:
            raise InvalidTransition(
                f"edit {edit_id} is superseded by edit {rec.superseded_by}, not rolled back; "
                f"roll back edit {rec.superseded_by} to bring it back"
            )
        keys = self._stored_keys(rec)
        old_id = self._conflict(keys)
        if old_id is not None:
            self._supersede(old_id, rec.id)
            rec.supersedes = old_id
        rec.superseded_by = None
        self._set_status(rec, ACTIVE, keys)
        return rec

    def recount(self) -> dict[str, int]:
        """Rebuild the status counters, the active set, the tombstones and the next id from the records (repair)."""
        counts = dict.fromkeys(STATUSES, 0)
        self.txn.drop("active")
        self.txn.drop("tombstones")
        last_id = 0
        for edit_id, data in self.txn.items("records"):
            last_id = edit_id
            rec = decode_json(data)
            status = rec.get("status")
            if status in counts:
                counts[status] += 1
            if status == ACTIVE:
                self.txn.put("active", edit_id, b"")
            elif is_tombstone(rec):
                self.txn.put("tombstones", edit_id, b"")
        self._counts = counts
        if not isinstance(self._next_id, int) or self._next_id <= last_id:
            self._next_id = last_id + 1
        return counts

    # --- commit --------------------------------------------------------------------------
    def finish(self, op: str) -> dict:
        """Append the log event and the new counters; returns the event."""
        seq = self._generation + 1
        event = {
            "seq": seq, "op": op, "time": self.time,
            "activated": sorted(i for i, on in self._final.items() if on and not self._initial[i]),
            "deactivated": sorted(i for i, on in self._final.items() if not on and self._initial[i]),
            "entombed": sorted(self._entombed),
        }
        self.txn.put("log", seq, encode_json(event))
        put_meta(self.txn, "generation", seq)
        put_meta(self.txn, "next_id", self._next_id)
        put_meta(self.txn, "counts", self._counts)
        return event

    def new_keys(self) -> dict[int, np.ndarray]:
        """Keys of the edits this transaction activated or made tombstones (for the in-memory indexes)."""
        return {**self._keys, **self._entombed}


def _pending_index(config: RegistryConfig) -> KeyIndex:
    """The keys one transaction activates, searched beside the committed index (small: on the CPU)."""
    from .index import KeyIndex  # faiss: only for writes that check conflicts

    return KeyIndex(config.key_dim, config.metric, capacity=16)
