"""The two rules decided by the nearest key, side by side: which edit an input is routed to (``routed``), and
which active edit a new or restored one replaces (``superseded``).

Both read distances from ``KeyIndex.search`` in the registry's metric. Routing uses the threshold; superseding
uses the (smaller) supersede distance, and routing uses that distance too, as the margin by which a tombstone
must lie nearer before it takes an input back from an active edit.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .types import RegistryConfig

if TYPE_CHECKING:
    from .index import KeyIndex


def routed(config: RegistryConfig, dists: Any, ids: Any, tomb_dists: Any | None, threshold: float | None = None) -> Any:
    """``ids`` (the nearest active edit per query, numpy or torch) with -1 where no edit fires: the nearest
    active key lies beyond the threshold, or a rolled-back edit's key (a tombstone, at ``tomb_dists``) lies
    nearer than it.

    Tombstones make rollback exact: the inputs an edit took over go back to the base model, not to a
    neighbouring edit that happens to lie within the threshold. "Nearer" is by more than the supersede
    distance (as Euclidean distance between unit keys, for cosine), so a tombstone never shadows an active
    edit within that distance of it: a re-edit of the same prompt, or the version a rollback brought back.
    ``threshold`` replaces the registry's for this search (a caller with its own test for the wider ring).
    """
    fires = dists <= (config.threshold if threshold is None else threshold)
    if tomb_dists is not None:
        margin = _chord(np.float64(config.supersede_distance), config.metric)
        fires &= _chord(dists, config.metric) <= _chord(tomb_dists, config.metric) + margin
    ids = ids.clone() if hasattr(ids, "clone") else ids.copy()  # torch stays torch, on its device
    ids[~fires] = -1
    return ids


def _chord(dist: Any, metric: str) -> Any:
    """Distance as a metric (triangle inequality): cosine distance 1 - cos(a, b) of unit keys is |a - b|^2 / 2."""
    return (2 * dist).clip(min=0) ** 0.5 if metric == "cosine" else dist


def superseded(keys: np.ndarray, within: float, committed: KeyIndex, pending: KeyIndex | None,
               changed: dict[int, bool], hint: tuple[float, int] | None = None) -> int | None:
    """The active edit with a key nearest to any of ``keys`` (an edit's phrasings), if within ``within``.

    ``committed`` holds the keys active before this write transaction, ``pending`` those it activated (None:
    none of them lies within ``within``, see ``near_earlier``), and ``changed`` says which ids it turned on
    (True) or off (False). ``hint`` is a precomputed (distance, id) from ``committed`` (one search for a whole
    batch).
    """
    dist, found = hint if hint is not None else nearest_row(committed.search(keys, 1))
    if changed.get(found) is False:  # turned off here: look past what this transaction deactivated
        dist, found = _nearest_still_active(keys, committed, changed)
    if pending is not None:
        pending_dist, pending_found = nearest_row(pending.search(keys, 1))
        if pending_dist < dist:
            dist, found = pending_dist, pending_found
    return found if found >= 0 and dist <= within else None


def near_earlier(key_sets: list[np.ndarray], within: float, metric: str, rows: int = 1024) -> set[int]:
    """The positions of ``key_sets`` (each an edit's (n, dim) keys) with a key within ``within`` of a key of an
    earlier set, allowing for rounding: the only edits of a batch that can supersede one inserted before them
    in the same transaction.

    One blocked matrix product over the whole batch, instead of one search per edit of the transaction's
    growing pending index (a 10k-edit import spent most of its time there).
    """
    from .index import _normalise  # faiss: loaded anyway by the conflict search that calls this

    keys = np.concatenate(key_sets).astype(np.float32)
    owner = np.repeat(np.arange(len(key_sets)), [len(k) for k in key_sets])
    if metric == "cosine":
        keys = _normalise(keys, in_place=True)  # the concatenation is our own copy
    else:
        squares = np.einsum("ij,ij->i", keys, keys)
    slack = 1e-4 + 1e-3 * within  # float32 dot products of unit keys err by ~1e-6
    near: set[int] = set()
    for start in range(0, len(keys), rows):
        dots = keys[start:start + rows] @ keys.T  # (rows, n)
        if metric == "cosine":
            dist = 1 - dots
        else:
            dist = np.sqrt(np.maximum(squares[start:start + rows, None] + squares[None, :] - 2 * dots, 0))
        close = (dist <= within + slack) & (owner[None, :] < owner[start:start + rows, None])
        near.update(owner[start:start + rows][close.any(1)].tolist())
    return near


def _nearest_still_active(keys: np.ndarray, committed: KeyIndex, changed: dict[int, bool]) -> tuple[float, int]:
    skipped = sum(committed.count(i) for i, on in changed.items() if not on)
    dists, ids = committed.search(keys, min(len(committed), skipped + 1))
    best = (math.inf, -1)
    for row_dists, row_ids in zip(dists.tolist(), ids.tolist()):
        for dist, found in zip(row_dists, row_ids):
            if changed.get(found) is not False:
                best = min(best, (dist, found))
                break
    return best


def nearest_row(result: tuple[np.ndarray, np.ndarray]) -> tuple[float, int]:
    """The nearest (distance, id) over all query rows of a k=1 search."""
    dists, ids = result
    row = int(np.argmin(dists[:, 0]))
    return float(dists[row, 0]), int(ids[row, 0])
