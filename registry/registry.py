"""The edit registry: a persistent, versioned store of edits with exact nearest-key routing.

LMDB (``store.py``) is the source of truth. The key index is derived data, built from the
active keys on first need, so model-free admin commands open instantly at any size. Every
write is one LMDB transaction that also appends one log event and bumps the generation; other
processes poll the generation (``refresh``) and replay the events into their index.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .codec import KEY_DTYPE, LIBRARY_VERSION, MAX_KEYS, SCHEMA_VERSION, adapter_nbytes, decode_adapter, decode_json, decode_keys
from .errors import CorruptEdit, EditNotFound, ReadOnlyError, RegistryError, SchemaError, ValidationError
from .meta import get_meta, init_meta, load_config, put_meta, stored_version, upgrade
from .nearest import routed
from .store import MAX_MAP_SIZE, Store, Txn
from .transaction import NewEdit, Stale, Transaction
from .types import STATUSES, Record, RegistryConfig, VerifyReport

if TYPE_CHECKING:  # torch and faiss load only when keys are searched or adapters decoded, never for listing
    import torch

    from .index import KeyIndex

log = logging.getLogger(__name__)
T = TypeVar("T")
Listener = Callable[[dict], None]
_CHUNK = 1000  # records per short read transaction when streaming


class EditRegistry:
    """Edits of one model: records, keys and adapters, with rollback/restore and search.

    Use :meth:`create` or :meth:`open`; the instance is a context manager.
    """

    def __init__(self, store: Store, config: RegistryConfig, *, backend: str, device: str | torch.device,
                 key_dtype: str = "float32"):
        self._store, self._config = store, config
        self._backend, self._device, self._key_dtype = backend, device, key_dtype
        self._index: KeyIndex | None = None  # active keys
        self._tombstones: KeyIndex | None = None  # rolled-back keys (see ``match``)
        self._listeners: list[Listener] = []
        self._seen = self.generation
        self.index_builds = 0  # times the active-key index was built from the store (not replayed into)

    # --- opening -------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: RegistryConfig, *, backend: str = "faiss",
               device: str | torch.device = "cpu", key_dtype: str = "float32",
               max_map_size: int = MAX_MAP_SIZE) -> EditRegistry:
        """Make a new registry in ``path`` (a new or empty directory); it may grow to ``max_map_size`` bytes.

        ``backend``, ``device`` and ``key_dtype`` say how this process searches the keys (see ``KeyIndex``);
        they are not stored.
        """
        path = os.fspath(path)
        if os.path.isfile(path):
            raise SchemaError(f"{path} is a file, not a registry directory")
        if cls.exists(path):
            raise RegistryError(f"a registry already exists at {path}")
        if os.path.isdir(path) and os.listdir(path):
            raise RegistryError(f"{path} is not empty; choose a new or empty directory")
        store = Store(path, create=True, max_map_size=max_map_size)
        try:
            store.write(lambda txn: init_meta(txn, config))
        except BaseException:
            store.close()
            raise
        return cls(store, config, backend=backend, device=device, key_dtype=key_dtype)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False, backend: str = "faiss",
             device: str | torch.device = "cpu", key_dtype: str = "float32",
             max_map_size: int = MAX_MAP_SIZE) -> EditRegistry:
        """Open an existing registry; ``readonly`` refuses every write (and works on a read-only filesystem)."""
        path = os.fspath(path)
        if os.path.isfile(path):
            raise SchemaError(f"{path} is a file, not a registry directory")
        if not os.path.isdir(path):
            raise SchemaError(f"no registry at {path}: the directory does not exist")
        if not cls.exists(path):
            raise SchemaError(f"{path} is not a registry (it has no data.mdb)")
        store = Store(path, readonly=readonly, max_map_size=max_map_size)
        try:
            version = stored_version(store)
            if not readonly and isinstance(version, int) and version < SCHEMA_VERSION:
                store.write(upgrade)
            with store.read() as txn:
                config = load_config(txn, path)
        except BaseException:
            store.close()
            raise
        return cls(store, config, backend=backend, device=device, key_dtype=key_dtype)

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(path), "data.mdb"))

    def close(self) -> None:
        self._store.close()
        self._index = self._tombstones = None
        self._listeners.clear()

    def __enter__(self) -> EditRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EditRegistry({self.path!r}, readonly={self.readonly})"

    # --- properties ----------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._store.path

    @property
    def config(self) -> RegistryConfig:
        return self._config

    @property
    def readonly(self) -> bool:
        return self._store.readonly

    @property
    def generation(self) -> int:
        """Number of writes ever committed; changes whenever any process writes."""
        with self._store.read() as txn:
            return get_meta(txn, "generation")

    @property
    def seen_generation(self) -> int:
        """The generation this instance has replayed up to (``refresh``); ``generation`` is the store's now."""
        return self._seen

    @property
    def key_index(self) -> KeyIndex | None:
        """The in-memory index of active keys, or None until a search or a conflict check builds it. Derived
        data, exposed for inspection: changing it changes routing until the next rebuild."""
        return self._index

    def indexed_ids(self) -> set[int]:
        """The edits the active-key index holds (building it if needed): ``verify`` checks they are the active
        ones."""
        return set(self._ensure_index().ids().tolist())

    def snapshot(self) -> tuple[int, dict[str, set[int]]]:
        """(generation, ids in each database) from one read transaction: what is stored, below the records."""
        with self._store.read() as txn:
            return get_meta(txn, "generation"), {db: set(txn.ids(db)) for db in
                                                 ("records", "keys", "adapters", "active", "tombstones")}

    # --- reading -------------------------------------------------------------------------
    def get(self, edit_id: int) -> Record:
        edit_id = _check_id(edit_id)
        with self._store.read() as txn:
            return _record(txn, edit_id)

    def records(self, status: str | None = None) -> Iterator[Record]:
        """All records (or those with ``status``) in id order, read in short transactions."""
        _check_status(status)
        start = 0
        while True:
            with self._store.read() as txn:
                chunk = [(i, bytes(data)) for i, data in islice(txn.items("records", start), _CHUNK)]
            for rec in map(Record.from_dict, decode_json(b"[" + b",".join(data for _, data in chunk) + b"]")):
                if status is None or rec.status == status:  # one parse per chunk: 10k records in ~40 ms
                    yield rec
            if len(chunk) < _CHUNK:
                return
            start = chunk[-1][0] + 1

    def count(self, status: str | None = None) -> int:
        _check_status(status)
        with self._store.read() as txn:
            counts = get_meta(txn, "counts")
        return sum(counts.values()) if status is None else counts[status]

    def keys(self, edit_id: int) -> np.ndarray:
        """An edit's keys, (1 + len(paraphrases), dim): its prompt's first, then each paraphrase's."""
        edit_id = _check_id(edit_id)
        with self._store.read() as txn:
            rec, data = _record(txn, edit_id), txn.get("keys", edit_id)
        return decode_keys(data, self._config.key_dim, edit_id, rec.key_sha256)

    def adapter(self, edit_id: int) -> dict[str, torch.Tensor]:
        return self.adapters([edit_id])[_check_id(edit_id)]

    def adapters(self, ids: Sequence[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Adapters of several edits from one read transaction, each verified against its record.

        An edit is handed out only whole: its key must match its checksum too, so an edit whose key
        or adapter is corrupt raises :class:`CorruptEdit` (naming it) and is never applied.
        """
        ids = [_check_id(edit_id) for edit_id in ids]
        with self._store.read() as txn:
            stored = [(_record(txn, i), txn.get("keys", i), txn.get("adapters", i)) for i in ids]
        adapters = {}
        for rec, key, data in stored:
            decode_keys(key, self._config.key_dim, rec.id, rec.key_sha256)
            adapters[rec.id] = decode_adapter(data, self._config, rec.id, rec.adapter_sha256)
        return adapters

    # --- search --------------------------------------------------------------------------
    def nearest(self, queries: Any) -> tuple[Any, Any]:
        """Distance to and id of the nearest active key (of any edit's phrasings) per query row, shape (n,) each.

        numpy in, numpy out; torch in, torch out on the queries' device. Call ``refresh()``
        first to see other processes' writes.
        """
        dists, ids = self._ensure_index().search(queries, 1)
        return dists[:, 0], ids[:, 0]

    def near(self, queries: Any, k: int) -> set[int]:
        """The active edits with a key among some query row's `k` nearest."""
        ids = self._ensure_index().search(queries, k)[1]
        return {int(i) for i in ids.reshape(-1).tolist() if i >= 0}

    def match(self, queries: Any, distances: bool = False, threshold: float | None = None) -> Any:
        """The edit id routed to per query row, or -1 (the rule: ``nearest.routed``, with tombstones; within
        ``threshold`` instead of the registry's when given). With ``distances``, (distance to the nearest active
        key, id) from the same search."""
        dists, ids = self.nearest(queries)
        tombstones = self._ensure_tombstones()
        tomb_dists = tombstones.search(queries, 1)[0][:, 0] if len(tombstones) else None
        ids = routed(self._config, dists, ids, tomb_dists, threshold)
        return (dists, ids) if distances else ids

    def _ensure_index(self) -> KeyIndex:
        if self._index is None:
            self._index = self._build_index("active")
        return self._index

    def _ensure_tombstones(self) -> KeyIndex:
        if self._tombstones is None:
            self._tombstones = self._build_index("tombstones")
        return self._tombstones

    def _build_index(self, db: str) -> KeyIndex:
        """The keys of the ids in ``db`` from one read transaction, each copied once into the index's matrix
        (derived data, never stored)."""
        from .index import KeyIndex

        with self._store.read(buffers=True) as txn:
            ids = list(txn.ids(db))
            ids, keys = _read_keys(txn, ids, self._config.key_dim, spare=max(16, len(ids) // 8))
        if db == "active":
            self.index_builds += 1
        return KeyIndex.from_matrix(ids, keys, self._config.metric, self._backend, self._device, self._key_dtype)

    # --- writing -------------------------------------------------------------------------
    def add(self, prompt: str, target: str, keys: Any, adapter: dict[str, torch.Tensor],
            info: dict | None = None, paraphrases: Sequence[str] = (), subject: str | None = None) -> int:
        """Store one edit: ``keys`` is the prompt's key (dim,), or one row per phrasing (1 + len(paraphrases),
        dim), all routing to this edit. The active edit with a key nearest to any of them, within
        ``config.supersede_distance``, becomes superseded by it. ``subject`` is kept in its record."""
        self._check_writable()
        edit = NewEdit.checked(self._config, prompt, target, keys, adapter, info, paraphrases, subject)
        return self._write("add", lambda tx: tx.insert(edit), needs_index=True)

    def add_many(self, items: Iterable[dict], batch_size: int = 1000, *,
                 check_conflicts: bool = True) -> list[int]:
        """Store many edits, one transaction per batch (each batch is all or nothing).

        Items are dicts with ``prompt``, ``target``, ``keys``, ``adapter`` and optional ``info``,
        ``paraphrases`` and ``subject`` (as the arguments of :meth:`add`).
        Conflicts are resolved as in :meth:`add`, in order. ``check_conflicts=False`` skips
        the search (O(N) per edit) for bulk loads whose keys are known to be far apart.
        """
        self._check_writable()
        if batch_size < 1:
            raise ValidationError(f"batch_size must be at least 1, got {batch_size}")
        new_ids: list[int] = []
        items = iter(items)
        while batch := list(islice(items, batch_size)):
            edits = [self._new_edit(item) for item in batch]
            new_ids += self._write("add", lambda tx: tx.insert_many(edits), needs_index=check_conflicts)
        return new_ids

    def _new_edit(self, item: dict) -> NewEdit:
        try:
            return NewEdit.checked(self._config, **item)
        except TypeError:
            raise ValidationError(
                f"add_many items are dicts with prompt, target, keys, adapter and optional info, paraphrases and "
                f"subject; "
                f"got {sorted(item)}"
            ) from None

    def rollback(self, edit_id: int) -> Record:
        """Take an edit out of service; the version it replaced (if any) comes back."""
        edit_id = _check_id(edit_id)
        return self._write("rollback", lambda tx: tx.rollback(edit_id), needs_index=False)

    def restore(self, edit_id: int) -> Record:
        """Put a rolled-back edit back in service, superseding a conflicting active edit."""
        edit_id = _check_id(edit_id)
        return self._write("restore", lambda tx: tx.restore(edit_id), needs_index=True)

    def set_threshold(self, threshold: float) -> RegistryConfig:
        """Change the routing threshold (``sola calibrate``); other processes pick it up on refresh."""
        config = RegistryConfig.from_dict({**self._config.to_dict(), "threshold": threshold})  # validates
        self._write("config", lambda tx: put_meta(tx.txn, "config", config.to_dict()), needs_index=False)
        return self._config

    def _write(self, op: str, body: Callable[[Transaction], T], *, needs_index: bool) -> T:
        """Run ``body`` in one write transaction, then update the index and tell listeners.

        The transaction refuses to run on a stale view (another process wrote since our last
        refresh): we refresh and try again, so conflict checks always see every active key.
        """
        self._check_writable()
        while True:
            self.refresh()
            index = self._ensure_index() if needs_index else None

            def run(txn: Txn) -> tuple[T, dict, dict]:
                tx = Transaction(txn, self._config, index, expected_generation=self._seen)
                result = body(tx)
                return result, tx.finish(op), tx.new_keys()

            try:
                result, event, keys = self._store.write(run)
            except Stale:
                continue
            self._seen = event["seq"]
            self._apply(event, keys)
            return result

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"registry at {self.path} is open read-only")

    # --- other processes -----------------------------------------------------------------
    def refresh(self) -> list[dict]:
        """Replay writes made since we last looked (by any process) into the index.

        Cheap when nothing changed: one read of the generation. Returns the new events.
        """
        with self._store.read() as txn:
            generation = get_meta(txn, "generation")
            if generation == self._seen:
                return []
            events = [decode_json(data) for _, data in islice(txn.items("log", self._seen + 1),
                                                              generation - self._seen)]
            keys = self._keys_for(txn, events) if self._index is not None or self._tombstones is not None else {}
        for event in events:
            self._apply(event, keys)
        self._seen = generation
        return events

    def _keys_for(self, txn: Txn, events: list[dict]) -> dict[int, np.ndarray]:
        ids = {i for event in events for i in event["activated"] + event.get("entombed", [])}
        rows, keys = _read_keys(txn, sorted(ids), self._config.key_dim)
        found, starts, counts = np.unique(np.asarray(rows, dtype=np.int64), return_index=True, return_counts=True)
        return {i: keys[start:start + n] for i, start, n in zip(found.tolist(), starts.tolist(), counts.tolist())}

    def _apply(self, event: dict, keys: dict[int, np.ndarray]) -> None:
        if event["op"] == "config":
            with self._store.read() as txn:
                self._config = load_config(txn, self.path)
        elif event["op"] == "repair":
            self._index = self._tombstones = None  # derived data was rebuilt in the store: rebuild ours lazily
        else:
            _replay(self._index, event["deactivated"], event["activated"], keys)
            _replay(self._tombstones, event["activated"], event.get("entombed", []), keys)
        for listener in list(self._listeners):
            listener(event)

    def event(self, seq: int) -> dict | None:
        """Log event number ``seq`` (1 .. generation): what one write changed, as ``refresh`` replays it."""
        with self._store.read() as txn:
            data = txn.get("log", _check_id(seq))
        return None if data is None else decode_json(data)

    def on_change(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` after every write seen (ours or replayed); returns an unsubscriber."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    # --- administration ------------------------------------------------------------------
    def stats(self) -> dict:
        """JSON-safe summary for ``sola stats``."""
        with self._store.read() as txn:
            counts, generation = get_meta(txn, "counts"), get_meta(txn, "generation")
            schema_version, next_id = get_meta(txn, "schema_version"), get_meta(txn, "next_id")
        config = self._config.to_dict()
        del config["fingerprint"]
        return {**counts, "total": sum(counts.values()), **config, "generation": generation,
                "next_id": next_id, "disk_bytes": self._store.disk_bytes, "map_size": self._store.map_size,
                "adapter_bytes": adapter_nbytes(self._config), "schema_version": schema_version,
                "library_version": LIBRARY_VERSION}

    def verify(self, repair: bool = False, fingerprint: dict | None = None) -> VerifyReport:
        """Check every stored edit and derived structure; ``repair`` rebuilds derived data and
        rolls back (never deletes) corrupt edits.

        ``fingerprint``: the model's, to check that this registry was made for it.
        """
        from . import verify

        if repair:
            self._check_writable()
        self.refresh()
        with self._store.read() as txn:
            report, corrupt = verify.check(txn, self._config, self._index, self._tombstones, fingerprint)
        if repair and not report.ok:
            report.repaired = self._write("repair", lambda tx: verify.repair(tx, corrupt),
                                          needs_index=False)
        return report

    def export(self, path: str | os.PathLike, status: str | None = "active") -> int:
        """Write the edits with ``status`` (None: all) to one safetensors bundle; returns the count."""
        from . import bundle

        records, keys, adapters = self._contents(status)
        bundle.write(os.fspath(path), self._config, records, keys, adapters)
        return len(records)

    def export_peft(self, directory: str | os.PathLike, base_model: str, status: str | None = "active") -> list[dict]:
        """Write one PEFT LoRA adapter directory per edit with ``status``, plus an index of names, edits and keys
        (registry/peft_format.py); returns the index rows. ``base_model`` is the name the serving engine knows the
        base model by (vLLM's filesystem resolver only loads adapters whose config names the served model)."""
        from . import peft_format

        records, keys, adapters = self._contents(status)
        return peft_format.write(os.fspath(directory), self._config, records, keys, adapters, base_model)

    def export_peft_adapter(self, directory: str | os.PathLike, edit_id: int, base_model: str) -> str:
        """Write one edit's PEFT adapter directory (as `export_peft` does, leaving its index alone) and return its
        name: what a router in front of a serving engine writes before the first request that names it."""
        from . import peft_format

        record = self.get(edit_id)
        adapter = self.adapters([record.id])[record.id]
        return peft_format.write_adapter(os.fspath(directory), self._config, record, adapter, base_model)

    def _contents(self, status: str | None) -> tuple[list[Record], dict[int, np.ndarray], dict[int, dict]]:
        records = list(self.records(status))
        keys: dict[int, np.ndarray] = {}
        adapters: dict[int, dict[str, torch.Tensor]] = {}
        for start in range(0, len(records), _CHUNK):
            ids = [rec.id for rec in records[start:start + _CHUNK]]
            keys.update((i, self.keys(i)) for i in ids)
            adapters.update(self.adapters(ids))
        return records, keys, adapters

    def import_(self, path: str | os.PathLike) -> list[int]:
        """Add every edit of a bundle in one transaction (all or nothing); returns the new ids."""
        from . import bundle

        self._check_writable()
        edits = bundle.read(os.fspath(path), self._config)
        self._store.reserve(os.path.getsize(path))
        return self._write("import", lambda tx: tx.insert_many(edits), needs_index=True)


def _replay(index: KeyIndex | None, removed: list[int], added: list[int], keys: dict[int, np.ndarray]) -> None:
    if index is None:
        return
    index.remove(removed)
    added = [i for i in added if i in keys]  # unreadable keys are never searched
    if added:
        index.add([i for i in added for _ in keys[i]], np.concatenate([keys[i] for i in added]))



def _record(txn: Txn, edit_id: int) -> Record:
    data = txn.get("records", edit_id)
    if data is None:
        raise EditNotFound(f"no edit with id {edit_id}")
    return Record.from_dict(decode_json(data))


def _read_keys(txn: Txn, ids: list[int], dim: int, spare: int = 0) -> tuple[list[int], np.ndarray]:
    """Every readable key of ``ids``, as the first rows of an (n + spare, dim) matrix, and the id of each row
    (an edit with several keys gives several rows, next to each other, in the order of ``ids``).

    Each key is copied once, straight from the store into the matrix. A missing, short or non-finite
    key is left out with a warning naming its edit: one corrupt edit must not stop the others from
    being served (``verify`` reports it, ``--repair`` rolls it back).
    """
    size = dim * KEY_DTYPE.itemsize
    blobs, good = [], []
    for edit_id in ids:
        blob = txn.get("keys", edit_id)
        if blob is not None and len(blob) % size == 0 and 0 < len(blob) <= MAX_KEYS * size:
            blobs.append(blob)
            good.append(edit_id)
        else:
            _warn_unreadable(None if blob is None else bytes(blob), dim, edit_id)
    counts = [len(blob) // size for blob in blobs]
    keys = np.empty((sum(counts) + spare, dim), dtype=np.float32)
    row_ids: list[int] = []
    row = 0
    for edit_id, blob, n in zip(good, blobs, counts):
        keys[row:row + n] = np.frombuffer(blob, dtype=KEY_DTYPE).reshape(n, dim)
        row_ids += [edit_id] * n
        row += n
    finite = np.isfinite(keys[:row]).all(axis=1)
    if finite.all():
        return row_ids, keys
    bad = {row_ids[r] for r in np.flatnonzero(~finite).tolist()}
    for edit_id in sorted(bad):
        log.warning("edit %d is not served: its key contains NaN or infinite values", edit_id)
    kept = np.flatnonzero([i not in bad for i in row_ids])
    keys[:len(kept)] = keys[kept]
    return [row_ids[r] for r in kept.tolist()], keys


def _warn_unreadable(blob: bytes | None, dim: int, edit_id: int) -> None:
    try:
        decode_keys(blob, dim, edit_id)
    except CorruptEdit as exc:
        log.warning("edit %d is not served: %s", edit_id, exc)


def _check_id(edit_id: Any) -> int:
    if isinstance(edit_id, bool) or not isinstance(edit_id, (int, np.integer)):
        raise ValidationError(f"edit id must be an integer, got {edit_id!r}")
    if not 0 <= edit_id < 1 << 63:
        raise ValidationError(f"edit ids are integers from 0 to 2**63 - 1, got {edit_id}")
    return int(edit_id)


def _check_status(status: str | None) -> None:
    if status is not None and status not in STATUSES:
        raise ValidationError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
