"""AdapterCache: stacked slots, LRU eviction, one loader call per batch of misses."""
import pytest
import torch
from registry_helpers import make_adapter, make_config

from registry import AdapterCache, ValidationError

CONFIG = make_config()


class Loader:
    """Records every call; adapter of edit i is make_adapter(seed=i)."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, ids):
        self.calls.append(list(ids))
        return {i: make_adapter(CONFIG, seed=i) for i in ids}


def make_cache(capacity=3):
    loader = Loader()
    return AdapterCache(CONFIG.layers, CONFIG.rank, capacity, loader), loader


def test_slots_hold_the_adapters_stacked_per_layer():
    cache, loader = make_cache()
    slots = cache.slots([5, 8, 5])
    assert slots.dtype == torch.long and slots[0] == slots[2] != slots[1]
    assert loader.calls == [[5, 8]]  # one call for all misses, duplicates once
    A, B = cache.tensors(1)
    assert A.shape == (3, 2, 12) and B.shape == (3, 10, 2)
    assert torch.equal(A[slots[1]], make_adapter(CONFIG, seed=8)["1.A"])
    assert torch.equal(B[slots[0]], make_adapter(CONFIG, seed=5)["1.B"])


def test_least_recently_used_is_evicted_first():
    cache, loader = make_cache(capacity=3)
    cache.slots([1])
    cache.slots([2])
    cache.slots([3])
    cache.slots([1])  # 2 is now the least recently used
    cache.slots([4])
    assert [i in cache for i in (1, 2, 3, 4)] == [True, False, True, True]
    cache.slots([5])  # then 3
    assert 3 not in cache and 1 in cache
    assert cache.stats() == {"hits": 1, "misses": 5, "size": 3, "capacity": 3}


def test_ids_of_one_call_are_never_evicted_by_it():
    cache, loader = make_cache(capacity=3)
    cache.slots([1, 2, 3])
    slots = cache.slots([1, 4, 5])  # 1 is the oldest but is needed now
    assert sorted(slots.tolist()) == [0, 1, 2]
    A, _ = cache.tensors(0)
    for edit_id, slot in zip([1, 4, 5], slots.tolist()):
        assert torch.equal(A[slot], make_adapter(CONFIG, seed=edit_id)["0.A"])
    assert loader.calls[-1] == [4, 5]


def test_more_distinct_ids_than_capacity_is_a_clear_error():
    cache, loader = make_cache(capacity=2)
    with pytest.raises(ValidationError, match="3 distinct edits.*holds only 2"):
        cache.slots([1, 2, 3])
    assert loader.calls == [] and len(cache) == 0


def test_evict_and_clear():
    cache, loader = make_cache()
    cache.slots([1, 2])
    cache.evict(1)
    cache.evict(99)
    assert 1 not in cache and len(cache) == 1
    cache.slots([1])
    assert loader.calls == [[1, 2], [1]]
    cache.clear()
    assert len(cache) == 0
    cache.slots([1, 2, 3])
    assert len(cache) == 3
