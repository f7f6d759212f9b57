"""Device-resident adapter slots, least recently used out first.

For each edited layer the cache holds all slots' A and B matrices stacked in one tensor, so the
layer can gather the rows' adapters by slot number and apply them with one ``bmm`` (the "Arrow"
pattern) instead of looping over edits.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from .errors import RegistryError, ValidationError
from .types import LayerSpec, adapter_names

Loader = Callable[[list[int]], dict[int, dict[str, torch.Tensor]]]


class AdapterCache:
    """``capacity`` adapter slots on ``device``; misses are filled by one ``loader`` call.

    ``loader(ids)`` returns ``{id: {"0.A": ..., "0.B": ..., ...}}`` (e.g. ``EditRegistry.adapters``).
    """

    def __init__(self, layers: list[LayerSpec], rank: int, capacity: int, loader: Loader,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        if capacity < 1:
            raise ValidationError(f"cache capacity must be at least 1, got {capacity}")
        self.capacity, self.device, self.dtype = capacity, torch.device(device), dtype
        self._loader = loader
        self._A = [torch.zeros(capacity, rank, layer.in_features, device=self.device, dtype=dtype)
                   for layer in layers]
        self._B = [torch.zeros(capacity, layer.out_features, rank, device=self.device, dtype=dtype)
                   for layer in layers]
        self._slots: OrderedDict[int, int] = OrderedDict()  # edit id -> slot, oldest use first
        self._free = list(range(capacity - 1, -1, -1))
        self._hits = self._misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._slots

    @property
    def nbytes(self) -> int:
        """Device memory held by the slots (all allocated up front)."""
        return sum(t.element_size() * t.numel() for t in (*self._A, *self._B))

    def tensors(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (A, B) of one layer: (capacity, rank, in) and (capacity, out, rank)."""
        return self._A[layer_idx], self._B[layer_idx]

    def slots(self, ids: Sequence[int]) -> torch.Tensor:
        """Slot of each id (same order, duplicates allowed), loading the missing ones first."""
        ids = [int(edit_id) for edit_id in ids]
        distinct = list(dict.fromkeys(ids))
        if len(distinct) > self.capacity:
            raise ValidationError(
                f"{len(distinct)} distinct edits requested at once but the adapter cache holds "
                f"only {self.capacity}; raise its capacity"
            )
        missing = [edit_id for edit_id in distinct if edit_id not in self._slots]
        for edit_id in distinct:
            if edit_id in self._slots:
                self._slots.move_to_end(edit_id)
        self._hits += len(distinct) - len(missing)
        self._misses += len(missing)
        if missing:
            self._load(missing)
        return torch.tensor([self._slots[edit_id] for edit_id in ids], dtype=torch.long,
                            device=self.device)

    def _load(self, missing: list[int]) -> None:
        """One loader call for all misses; their slots come from free ones, then the LRU end.

        This call's hits were just moved to the recent end, so they are never evicted here.
        """
        adapters = self._loader(missing)
        absent = [edit_id for edit_id in missing if edit_id not in adapters]
        if absent:
            raise RegistryError(f"the adapter loader returned nothing for edit {absent[0]}")
        slots = [self._take_slot() for _ in missing]
        for edit_id, slot in zip(missing, slots):
            self._slots[edit_id] = slot
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for i, (A, B) in enumerate(zip(self._A, self._B)):
            a, b = adapter_names(i)
            A.index_copy_(0, index, self._stack(adapters, missing, a))
            B.index_copy_(0, index, self._stack(adapters, missing, b))

    def _stack(self, adapters: dict, ids: list[int], name: str) -> torch.Tensor:
        return torch.stack([adapters[edit_id][name] for edit_id in ids]).to(self.device, self.dtype)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        _, slot = self._slots.popitem(last=False)
        return slot

    def evict(self, edit_id: int) -> None:
        """Forget one edit (e.g. after its rollback); absent ids are ignored."""
        slot = self._slots.pop(edit_id, None)
        if slot is not None:
            self._free.append(slot)

    def clear(self) -> None:
        self._slots.clear()
        self._free = list(range(self.capacity - 1, -1, -1))

    def stats(self) -> dict:
        """Hits and misses count distinct ids per ``slots`` call."""
        return {"hits": self._hits, "misses": self._misses, "size": len(self._slots),
                "capacity": self.capacity}
