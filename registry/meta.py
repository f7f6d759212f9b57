"""The meta database: what a registry knows about itself, beside its edits.

One JSON value per name, written only inside write transactions:

- ``schema_version``: the layout of every database (``codec.SCHEMA_VERSION``); older ones are upgraded on open;
- ``config``: the persisted ``RegistryConfig`` (model fingerprint, layers, threshold, ...);
- ``next_id``: the id the next new edit gets (ids are never reused);
- ``generation``: writes ever committed, also the sequence number of the last ``log`` event;
- ``counts``: edits per status;
- ``created``, ``library_version``: when and by which release the registry was made.
"""
from __future__ import annotations

import time
from typing import Any

from .codec import LIBRARY_VERSION, SCHEMA_VERSION, decode_json, encode_json
from .errors import RegistryError, SchemaError
from .store import Store, Txn
from .types import STATUSES, RegistryConfig, is_tombstone


def get_meta(txn: Txn, name: str) -> Any:
    data = txn.get("meta", name)
    return None if data is None else decode_json(data)


def put_meta(txn: Txn, name: str, value: Any) -> None:
    txn.put("meta", name, encode_json(value))


def init_meta(txn: Txn, config: RegistryConfig) -> None:
    """The meta of a new, empty registry."""
    if get_meta(txn, "schema_version") is not None:
        raise RegistryError("a registry already exists here")
    for name, value in {"schema_version": SCHEMA_VERSION, "config": config.to_dict(), "next_id": 1,
                        "generation": 0, "created": time.time(), "library_version": LIBRARY_VERSION,
                        "counts": dict.fromkeys(STATUSES, 0)}.items():
        put_meta(txn, name, value)


def stored_version(store: Store) -> Any:
    with store.read() as txn:
        return get_meta(txn, "schema_version")


def upgrade(txn: Txn) -> None:
    """Bring a registry written by an older version up to this schema, in the open's write transaction.

    Version 1 had no tombstones: every rolled-back edit becomes one, as if rolled back today. Version 2 held one
    key per edit, which version 3 reads as it is.
    """
    version = get_meta(txn, "schema_version")
    if not isinstance(version, int) or version >= SCHEMA_VERSION:
        return
    if version == 1:
        for edit_id, data in txn.items("records"):
            if is_tombstone(decode_json(data)):
                txn.put("tombstones", edit_id, b"")
    put_meta(txn, "schema_version", SCHEMA_VERSION)


def load_config(txn: Txn, path: str) -> RegistryConfig:
    """The registry's config, refused (SchemaError) when the schema is not this version's."""
    version = get_meta(txn, "schema_version")
    if version is None:
        raise SchemaError(f"{path} is not a registry (it has no schema version)")
    if isinstance(version, int) and version < SCHEMA_VERSION:
        raise SchemaError(f"registry at {path} was written by an older version (schema {version}); open it once "
                          "without read-only to upgrade it")
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"registry schema version {version} is not supported by this version (expects {SCHEMA_VERSION})"
        )
    try:
        return RegistryConfig.from_dict(get_meta(txn, "config"))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"registry at {path} has an unreadable config: {exc}") from None
