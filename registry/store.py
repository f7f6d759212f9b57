"""The LMDB environment: the registry's single source of truth.

This is the only module that imports :mod:`lmdb`. It keeps one ``Environment`` per path per
process (LMDB calls a second open of the same path a serious error), gives out short read
transactions, and runs write transactions that grow the memory map by doubling when it is full.
"""
from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import lmdb

from .errors import ReadOnlyError, RegistryError, SchemaError

DATABASES = ("meta", "records", "keys", "adapters", "log", "active", "tombstones")
INITIAL_MAP_SIZE = 64 << 20
MAX_MAP_SIZE = 1 << 40
T = TypeVar("T")


def _encode(key: int | str) -> bytes:
    """Ints become 8-byte big-endian so that ids iterate in numeric order."""
    return struct.pack(">Q", key) if isinstance(key, int) else key.encode()


class Txn:
    """One LMDB transaction seen through database names; values come back as bytes, or as memoryviews into the
    map (valid only while the transaction lives) when it was opened with buffers=True."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database]):
        self._txn = txn
        self._dbs = dbs

    def get(self, db: str, key: int | str) -> bytes | memoryview | None:
        return self._txn.get(_encode(key), db=self._dbs[db])

    def put(self, db: str, key: int | str, value: bytes) -> None:
        # A new id is the highest: appending fills leaf pages instead of splitting them in half, which
        # halves the pages of small values (keys, records). LMDB refuses (False) an append out of order.
        if not (isinstance(key, int) and self._txn.put(_encode(key), value, db=self._dbs[db], append=True)):
            self._txn.put(_encode(key), value, db=self._dbs[db])

    def delete(self, db: str, key: int | str) -> None:
        self._txn.delete(_encode(key), db=self._dbs[db])

    def items(self, db: str, start: int = 0) -> Iterator[tuple[int, bytes]]:
        """(id, value) pairs of an id-keyed database, from ``start`` on, in id order."""
        cursor = self._txn.cursor(db=self._dbs[db])
        if cursor.set_range(_encode(start)):
            for key, value in cursor.iternext():
                yield struct.unpack(">Q", key)[0], value

    def ids(self, db: str, start: int = 0) -> Iterator[int]:
        cursor = self._txn.cursor(db=self._dbs[db])
        if cursor.set_range(_encode(start)):
            for key in cursor.iternext(values=False):
                yield struct.unpack(">Q", key)[0]

    def entries(self, db: str) -> int:
        return self._txn.stat(self._dbs[db])["entries"]

    def drop(self, db: str) -> None:
        """Empty a database (used to rebuild derived data)."""
        self._txn.drop(self._dbs[db], delete=False)


@dataclass
class _Shared:
    env: lmdb.Environment
    dbs: dict[str, lmdb._Database]
    readonly: bool
    refs: int = 1


_ENVS: dict[str, _Shared] = {}
_ENVS_LOCK = threading.Lock()


def _open_env(path: str, readonly: bool, create: bool, map_size: int) -> _Shared:
    data_file = os.path.join(path, "data.mdb")
    if os.path.exists(data_file):
        map_size = max(map_size, os.path.getsize(data_file))
    writable_dir = os.access(path, os.W_OK)
    if not readonly and not writable_dir:
        raise ReadOnlyError(
            f"registry at {path} is not writable (read-only filesystem or no permission); "
            "it can still be opened read-only, to read and to serve"
        )
    try:
        env = lmdb.open(
            path, subdir=True, create=create, readonly=readonly, lock=writable_dir or not readonly,
            map_size=map_size, max_dbs=len(DATABASES) + 2,
        )
    except lmdb.Error as exc:
        raise SchemaError(f"cannot open registry at {path}: {exc}") from None
    try:
        dbs = {name: env.open_db(name.encode(), create=not readonly) for name in DATABASES}
    except lmdb.Error:
        env.close()
        raise SchemaError(f"{path} is not a registry, or was written by an older version and is opened read-only "
                          "(its databases are missing; open an older registry once without read-only to upgrade it)"
                          ) from None
    if not readonly:
        env.reader_check()  # free reader slots left by killed processes, so old pages can be reused
    return _Shared(env, dbs, readonly)


class Store:
    """A shared handle on the LMDB environment at ``path`` (a directory)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        readonly: bool = False,
        create: bool = False,
        map_size: int = INITIAL_MAP_SIZE,
        max_map_size: int = MAX_MAP_SIZE,
    ):
        self.path = os.path.realpath(path)
        self.readonly = readonly
        self.max_map_size = max_map_size
        map_size = min(map_size, max_map_size)
        if create:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as exc:
                raise RegistryError(f"cannot create a registry at {self.path}: {exc.strerror}") from None
        self._shared = self._acquire(create, map_size)
        self._closed = False

    def _acquire(self, create: bool, map_size: int) -> _Shared:
        with _ENVS_LOCK:
            shared = _ENVS.get(self.path)
            if shared is None:
                shared = _ENVS[self.path] = _open_env(self.path, self.readonly, create, map_size)
            elif shared.readonly and not self.readonly:
                raise RegistryError(
                    f"registry at {self.path} is already open read-only in this process; close it first"
                )
            else:
                shared.refs += 1
            return shared

    @property
    def env(self) -> lmdb.Environment:
        if self._closed:
            raise RegistryError(f"registry at {self.path} is closed")
        return self._shared.env

    def _begin(self, write: bool, buffers: bool = False) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write, buffers=buffers)
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size, then start again.
            self.env.set_mapsize(0)
            return self.env.begin(write=write, buffers=buffers)

    @contextlib.contextmanager
    def read(self, buffers: bool = False) -> Iterator[Txn]:
        """A short read transaction; copy what you need out of it before it ends.

        With ``buffers=True`` values are memoryviews straight onto the map (no copy), valid only
        inside the transaction: for bulk reads that copy into one array anyway.
        """
        try:
            with self._begin(write=False, buffers=buffers) as txn:
                yield Txn(txn, self._shared.dbs)
        except lmdb.Error as exc:
            raise RegistryError(f"cannot read the registry at {self.path}: {exc}") from None

    def write(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in one write transaction, growing the map and re-running it when full.

        ``fn`` may run more than once, so it must only change the store through its ``Txn``.
        """
        if self.readonly:
            raise ReadOnlyError(f"registry at {self.path} is open read-only")
        while True:
            try:
                with self._begin(write=True) as txn:
                    return fn(Txn(txn, self._shared.dbs))
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:  # e.g. the disk is full: LMDB aborted the transaction
                raise RegistryError(
                    f"could not write to the registry at {self.path} (is the disk full?); nothing was written: {exc}"
                ) from None

    def reserve(self, nbytes: int) -> None:
        """Grow the map ahead of a write of about ``nbytes``, so that one big transaction runs once instead of
        being re-run after each doubling (`write`)."""
        used = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        size = self.map_size
        while size < used + 2 * nbytes and size * 2 <= self.max_map_size:
            size *= 2
        if size != self.map_size:
            self.env.set_mapsize(size)

    def _grow(self) -> None:
        size = self.map_size
        if size * 2 > self.max_map_size:
            raise RegistryError(
                f"registry is full: its map size of {size} bytes cannot double past {self.max_map_size} bytes"
            )
        self.env.set_mapsize(size * 2)

    @property
    def map_size(self) -> int:
        return self.env.info()["map_size"]

    @property
    def disk_bytes(self) -> int:
        return os.path.getsize(os.path.join(self.path, "data.mdb"))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _ENVS_LOCK:
            self._shared.refs -= 1
            if self._shared.refs == 0:
                self._shared.env.close()
                del _ENVS[self.path]
