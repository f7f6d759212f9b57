"""Exact nearest-key search over the active keys.

This is the only module that imports :mod:`faiss`. The keys live in one contiguous float32
matrix whose first ``len(index)`` rows are in use; removing a key moves the last row into its
hole, so a rollback costs O(dim), not O(N) as ``IndexIDMap2.remove_ids`` would. Search is a
brute-force ``faiss.knn`` (or a torch matmul) over that prefix: exact, with no index object to
keep in sync.

A scan reads every key once per search, so its cost is the key matrix's size over memory bandwidth.
``key_dtype="float16"`` (torch backend, cosine) halves that: the device holds fp16 keys for the scan and
the host keeps the float32 keys to rescore the scan's best candidates exactly (see ``_knn_half``).
"""
from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from .errors import ValidationError

# Below this many queries faiss skips BLAS; batched queries are 3-5x faster with it. faiss reads it from a
# process-wide variable (no per-call argument), so it is set where this module searches (``_knn``), not on import.
BLAS_THRESHOLD = 20
BACKENDS = ("faiss", "torch")
KEY_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# fp16 scan: extra candidates rescored in float32, and how far (in cosine similarity) an fp16 score may
# sit from the exact one. Unit vectors rounded to fp16 move by at most 2**-11 each, so q.k moves by about
# 2**-10; the slack allows 4x that for the rounding of the score itself and of the accumulation.
_HALF_EXTRA = 7
_HALF_SLACK = 4 * 2.0 ** -10
_GPU_FAISS = hasattr(faiss, "StandardGpuResources")
_gpu_resources = None


def _faiss_gpu_resources() -> Any:
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def _knn_gpu(q: torch.Tensor, keys: torch.Tensor, k: int, metric: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss GPU search on torch tensors (only with a GPU build of faiss)."""
    import faiss.contrib.torch_utils  # noqa: F401  (patches faiss to take torch tensors)

    return faiss.knn_gpu(_faiss_gpu_resources(), q, keys, k, metric=metric)


def _faiss_knn(q: np.ndarray, keys: np.ndarray, k: int, metric: int) -> tuple[np.ndarray, np.ndarray]:
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss.knn(q, keys, k, metric=metric)


def _normalise(x: np.ndarray | torch.Tensor, in_place: bool = False) -> np.ndarray | torch.Tensor:
    """Unit rows (zero rows stay zero) so that inner product is cosine similarity; ``in_place`` (numpy)
    divides ``x`` itself instead of allocating a copy."""
    if isinstance(x, torch.Tensor):
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x))[:, None], 1e-12)  # no (n, dim) temporary
    if in_place:
        x /= norms
        return x
    return x / norms


class KeyIndex:
    """Active keys with int64 edit ids, one or more keys per id; ``search`` returns exact nearest neighbours
    (an id reached through several of its keys counts each of them).

    Distances: ``1 - cosine similarity`` for ``metric="cosine"``, Euclidean for ``"l2"``.
    ``add`` of a present id replaces its keys and ``remove`` of an absent id does nothing, so
    replaying a change twice is harmless.
    """

    def __init__(self, dim: int, metric: str = "cosine", backend: str = "faiss",
                 device: str | torch.device = "cpu", capacity: int = 1024, key_dtype: str = "float32"):
        if metric not in ("cosine", "l2"):
            raise ValidationError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if backend not in BACKENDS:
            raise ValidationError(f"index backend must be 'faiss' or 'torch', got {backend!r}")
        self.device = torch.device(device)
        if backend == "faiss" and self.device.type != "cpu" and not _GPU_FAISS:
            raise ValidationError(
                f"the installed faiss has no GPU support, so it cannot search on {self.device}; "
                "use backend='torch'"
            )
        if key_dtype not in KEY_DTYPES:
            raise ValidationError(f"key_dtype must be one of {', '.join(KEY_DTYPES)}, got {key_dtype!r}")
        if key_dtype == "float16" and (backend != "torch" or metric != "cosine"):
            raise ValidationError("float16 keys need backend='torch' and metric='cosine' (exact rescoring "
                                  "relies on unit-length keys)")
        self.dim, self.metric, self.backend, self.key_dtype = dim, metric, backend, key_dtype
        self._on_torch = backend == "torch" or self.device.type != "cpu"
        self._half = key_dtype == "float16"
        self._master = np.empty((max(capacity, 1), dim), np.float32) if self._half else None  # exact copy
        self._keys = self._alloc(max(capacity, 1))
        self._ids = np.empty(max(capacity, 1), dtype=np.int64)
        self._rows: dict[int, list[int]] = {}  # id -> its rows
        self._n = 0

    @classmethod
    def from_matrix(cls, ids: Any, keys: np.ndarray, metric: str = "cosine", backend: str = "faiss",
                    device: str | torch.device = "cpu", key_dtype: str = "float32") -> KeyIndex:
        """An index over ``keys[:len(ids)]``, taking ownership of ``keys`` (float32, C-contiguous, finite).

        Rows of ``keys`` past ``len(ids)`` are spare capacity. On the CPU the matrix itself becomes the
        index (normalised in place): building an index over 100k keys then copies nothing.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n, capacity = len(ids), len(keys)
        if keys.dtype != np.float32 or not keys.flags.c_contiguous or keys.ndim != 2 or capacity < max(n, 1):
            raise ValidationError("from_matrix needs a C-contiguous float32 (capacity >= len(ids), dim) matrix")
        index = cls(keys.shape[1], metric, backend, device, capacity=1, key_dtype=key_dtype)
        if index._on_torch or index._half:  # the keys go to another device or dtype anyway: copy them once
            index._reserve(capacity)
            index.add(ids, keys[:n])
        else:
            if metric == "cosine":
                _normalise(keys[:n], in_place=True)
            index._keys, index._ids = keys, np.empty(capacity, dtype=np.int64)
            index._ids[:n] = ids
            for row, edit_id in enumerate(ids.tolist()):
                index._rows.setdefault(edit_id, []).append(row)
            index._n = n
        return index

    def _alloc(self, capacity: int) -> np.ndarray | torch.Tensor:
        if self._on_torch:
            return torch.empty(capacity, self.dim, dtype=KEY_DTYPES[self.key_dtype], device=self.device)
        return np.empty((capacity, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._rows

    def ids(self) -> np.ndarray:
        """The id of every key, in row order (an id with several keys appears once per key)."""
        return self._ids[: self._n].copy()

    def count(self, edit_id: int) -> int:
        """How many keys ``edit_id`` has here."""
        return len(self._rows.get(edit_id, ()))

    @property
    def nbytes(self) -> int:
        """Memory held (allocated capacity: keys, ids and any float32 copy), for capacity planning."""
        keys = self._keys.element_size() * self._keys.numel() if self._on_torch else self._keys.nbytes
        return keys + self._ids.nbytes + (self._master.nbytes if self._half else 0)

    def add(self, ids: Any, keys: Any) -> None:
        """Insert keys, shape (m, dim), under their edit ids (an id given m times gets m keys); an id already
        present has its keys replaced by these."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        keys = self._as_matrix(keys, "keys")
        if len(ids) != len(keys):
            raise ValidationError(f"got {len(ids)} ids for {len(keys)} keys")
        if not np.isfinite(keys).all():
            raise ValidationError("keys contain NaN or infinite values")
        given = ids.tolist()
        self.remove([edit_id for edit_id in dict.fromkeys(given) if edit_id in self._rows])
        start, end = self._n, self._n + len(ids)
        self._reserve(end)
        for row, edit_id in enumerate(given, start):
            self._rows.setdefault(edit_id, []).append(row)
        keys = _normalise(keys) if self.metric == "cosine" else keys
        if self._on_torch:
            self._keys[start:end] = torch.from_numpy(keys).to(self.device, self._keys.dtype)
        else:
            self._keys[start:end] = keys
        if self._half:
            self._master[start:end] = keys
        self._ids[start:end] = ids
        self._n = end

    def _reserve(self, size: int) -> None:
        """Double the capacity until ``size`` rows fit."""
        capacity = len(self._ids)
        if size <= capacity:
            return
        while capacity < size:
            capacity *= 2
        keys, ids = self._alloc(capacity), np.empty(capacity, dtype=np.int64)
        keys[: self._n] = self._keys[: self._n]
        ids[: self._n] = self._ids[: self._n]
        self._keys, self._ids = keys, ids
        if self._half:
            master = np.empty((capacity, self.dim), np.float32)
            master[: self._n] = self._master[: self._n]
            self._master = master

    def remove(self, ids: Any) -> None:
        """Drop every key of each id, each key by moving the last row into its hole (O(dim) per key)."""
        for edit_id in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
            for row in sorted(self._rows.pop(edit_id, ()), reverse=True):  # highest first: lower holes stay put
                last = self._n - 1
                if row != last:
                    moved = int(self._ids[last])
                    self._keys[row] = self._keys[last]
                    if self._half:
                        self._master[row] = self._master[last]
                    self._ids[row] = moved
                    moved_rows = self._rows[moved]
                    moved_rows[moved_rows.index(last)] = row
                self._n = last

    def search(self, queries: Any, k: int = 1) -> tuple[Any, Any]:
        """Distances and ids, each shape (n, k), nearest first; -1 and +inf where none.

        Takes numpy or torch (any float dtype) and answers in kind: torch answers are on
        the queries' device. Rows with NaN or inf find nothing.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValidationError(f"k must be a positive integer, got {k!r}")
        as_torch = isinstance(queries, torch.Tensor)
        q, bad = self._zero_non_finite(self._queries(queries))
        dist = np.full((len(q), k), np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        found = min(k, self._n)
        if found:
            d, rows = self._knn(q, found)
            dist[:, :found], ids[:, :found] = d, self._ids[rows]
            dist[bad], ids[bad] = np.inf, -1
        if as_torch:
            return torch.from_numpy(dist).to(queries.device), torch.from_numpy(ids).to(queries.device)
        return dist, ids

    def _zero_non_finite(self, q: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, np.ndarray]:
        """Zero the rows holding NaN or inf (they must find nothing); also returns their mask."""
        finite = torch.isfinite(q).all(1) if self._on_torch else np.isfinite(q).all(1)
        if bool(finite.all()):
            return q, np.zeros(len(q), dtype=bool)
        q = q.clone() if self._on_torch else q.copy()
        q[~finite] = 0
        return q, ~(finite.cpu().numpy() if self._on_torch else finite)

    def _as_matrix(self, x: Any, what: str) -> np.ndarray:
        """Any (m, dim) float array or tensor as contiguous float32 numpy."""
        if isinstance(x, torch.Tensor):
            x = x.detach().to("cpu", torch.float32).numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValidationError(f"{what} must have shape (n, {self.dim}), got {tuple(x.shape)}")
        return x

    def _queries(self, queries: Any) -> np.ndarray | torch.Tensor:
        """Convert once, at the boundary, to what the backend searches with."""
        if self._on_torch and isinstance(queries, torch.Tensor):
            if queries.ndim != 2 or queries.shape[1] != self.dim:
                raise ValidationError(
                    f"queries must have shape (n, {self.dim}), got {tuple(queries.shape)}"
                )
            q = queries.detach().to(self.device, torch.float32).contiguous()
        elif self._on_torch:
            q = torch.from_numpy(self._as_matrix(queries, "queries")).to(self.device)
        else:
            q = self._as_matrix(queries, "queries")
        return _normalise(q) if self.metric == "cosine" else q

    def _knn(self, q: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact k-NN over the used rows: (distances, row numbers), both numpy."""
        if self.backend == "torch":
            return self._knn_torch(q, k)
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self._on_torch:
            d, rows = _knn_gpu(q, self._keys[: self._n], k, metric)
            d, rows = d.cpu().numpy(), rows.cpu().numpy()
        else:
            d, rows = _faiss_knn(q, self._keys[: self._n], k, metric)
        return (1.0 - d, rows) if self.metric == "cosine" else self._exact_l2(q, rows)

    def _exact_l2(self, q: np.ndarray | torch.Tensor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances of the rows faiss found, recomputed as |q - k| and re-sorted. faiss's L2 expands
        |q - k|^2 as |q|^2 + |k|^2 - 2 q.k, whose float32 rounding the square root magnifies near zero: with
        faiss-cpu 1.15 a stored key found itself at 0.002 instead of 0."""
        found = np.maximum(rows, 0)
        if self._on_torch:
            picked = self._keys[torch.from_numpy(found).to(self._keys.device)]  # (n, k, dim)
            d = (q[:, None, :].to(picked.dtype) - picked).norm(dim=2).cpu().numpy()
        else:
            d = np.linalg.norm(q[:, None, :] - self._keys[found], axis=2)
        d = np.where(rows >= 0, d, np.inf).astype(np.float32)
        order = np.argsort(d, axis=1, kind="stable")
        return np.take_along_axis(d, order, 1), np.take_along_axis(rows, order, 1)

    def _knn_torch(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._half:
            return self._knn_half(q, k)
        keys = self._keys[: self._n]                                   # (N, dim)
        if self.metric == "cosine":
            sim, rows = (q @ keys.T).topk(k, dim=1)                    # (n, k)
            d = 1.0 - sim
        else:
            sq = (q * q).sum(1, keepdim=True) - 2 * q @ keys.T + (keys * keys).sum(1)  # (n, N)
            d2, rows = sq.clamp_min(0).topk(k, dim=1, largest=False)
            d = d2.sqrt()
        return d.cpu().numpy(), rows.cpu().numpy()

    def _knn_half(self, q: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """fp16 scan for ``k + _HALF_EXTRA`` candidates, then exact float32 rescoring on the host copy.

        Still exact: a key left out scored at most the last candidate's fp16 score, so its true similarity
        is at most that plus ``_HALF_SLACK``. Rows where that could beat the rescored k-th best (near ties
        around the cut) are searched again over all float32 keys.
        """
        keys = self._keys[: self._n]                                   # (N, dim) fp16
        c = min(self._n, k + _HALF_EXTRA)
        approx, cand = (q.to(keys.dtype) @ keys.T).topk(c, dim=1)      # (n, c)
        cand = cand.cpu().numpy()
        qn = q.float().cpu().numpy()                                   # (n, dim)
        exact = np.einsum("nd,ncd->nc", qn, self._master[cand])        # (n, c)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]       # (n, k)
        rows, sim = np.take_along_axis(cand, order, 1), np.take_along_axis(exact, order, 1)
        if c < self._n:
            unsure = approx[:, -1].float().cpu().numpy() + _HALF_SLACK >= sim[:, -1]
            if unsure.any():
                d, r = _faiss_knn(qn[unsure], self._master[: self._n], k, faiss.METRIC_INNER_PRODUCT)
                sim[unsure], rows[unsure] = d, r
        return 1.0 - sim, rows
