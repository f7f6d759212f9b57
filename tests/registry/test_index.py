"""KeyIndex: exact search against a numpy reference; faiss and torch backends agree exactly."""
import numpy as np
import pytest
import torch

from registry import KeyIndex, ValidationError
from registry import index as index_module

DIM = 24


def reference(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, metric: str, k: int):
    """Brute force in float64: what the index must return."""
    keys, queries = keys.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
        dist = 1.0 - unit(queries) @ unit(keys).T
    else:
        dist = np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


def filled(metric: str, backend: str, n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((n, DIM)).astype(np.float32)
    ids = rng.choice(10 * n, size=n, replace=False).astype(np.int64)
    index = KeyIndex(DIM, metric, backend, capacity=8)  # forces several capacity doublings
    index.add(ids, keys)
    return index, keys, ids


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_matches_brute_force(metric, backend):
    index, keys, ids = filled(metric, backend)
    queries = np.random.default_rng(1).standard_normal((40, DIM)).astype(np.float32)
    dist, found = index.search(queries, k=3)
    want_dist, want_ids = reference(keys, ids, queries, metric, 3)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(dist, want_dist, rtol=1e-4, atol=1e-4)
    exact_dist, exact_ids = index.search(keys[:5], k=1)  # a stored key finds itself at distance 0
    np.testing.assert_array_equal(exact_ids[:, 0], ids[:5])
    np.testing.assert_allclose(exact_dist[:, 0], 0, atol=1e-3)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_and_torch_agree_after_swap_removals(metric):
    faiss_index, keys, ids = filled(metric, "faiss", n=800, seed=5)
    torch_index, _, _ = filled(metric, "torch", n=800, seed=5)
    gone = np.random.default_rng(6).choice(ids, size=300, replace=False)
    for index in (faiss_index, torch_index):
        index.remove(gone[:150])
        for edit_id in gone[150:]:
            index.remove([edit_id])
    kept = ~np.isin(ids, gone)
    assert len(faiss_index) == len(torch_index) == kept.sum()
    assert set(faiss_index.ids().tolist()) == set(ids[kept].tolist())
    queries = np.random.default_rng(7).standard_normal((64, DIM)).astype(np.float32)
    f_dist, f_ids = faiss_index.search(queries, k=4)
    t_dist, t_ids = torch_index.search(queries, k=4)
    np.testing.assert_array_equal(f_ids, t_ids)
    np.testing.assert_allclose(f_dist, t_dist, rtol=1e-5, atol=1e-5)
    want_dist, want_ids = reference(keys[kept], ids[kept], queries, metric, 4)
    np.testing.assert_array_equal(f_ids, want_ids)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_empty_index_and_k_beyond_size(backend):
    index = KeyIndex(DIM, "l2", backend)
    dist, ids = index.search(np.zeros((2, DIM), np.float32), k=2)
    assert (ids == -1).all() and np.isinf(dist).all()
    index.add([7], np.ones((1, DIM)))
    dist, ids = index.search(np.ones((1, DIM)), k=3)
    assert ids.tolist() == [[7, -1, -1]]
    assert dist[0, 0] == pytest.approx(0, abs=1e-6) and np.isinf(dist[0, 1:]).all()


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_torch_in_torch_out(backend):
    index, keys, ids = filled("cosine", backend, n=50)
    queries = torch.from_numpy(keys[:3]).to(torch.float16)
    dist, found = index.search(queries, k=1)
    assert isinstance(found, torch.Tensor) and found.dtype == torch.int64
    assert isinstance(dist, torch.Tensor) and dist.device == queries.device
    assert found[:, 0].tolist() == ids[:3].tolist()


def test_add_replaces_and_remove_ignores_unknown():
    index = KeyIndex(DIM, "l2", "faiss")
    index.add([1, 2], np.stack([np.zeros(DIM), np.ones(DIM)]))
    index.add([1], np.full((1, DIM), 5.0))  # replaces edit 1's key
    assert len(index) == 2 and 1 in index and 3 not in index
    assert index.search(np.zeros((1, DIM)))[1][0, 0] == 2  # the old key of 1 is gone
    index.remove([3, 2, 2])
    assert index.ids().tolist() == [1]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_several_keys_per_id_are_added_searched_and_removed_together(backend):
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((9, DIM)).astype(np.float32)
    ids = [1, 1, 1, 2, 3, 3, 4, 5, 5]  # edit 1 has three keys, 3 and 5 two
    index = KeyIndex(DIM, "cosine", backend)
    index.add(ids, keys)
    assert len(index) == 9
    assert index.search(keys)[1][:, 0].tolist() == ids  # each key finds its own edit
    index.remove([1, 5])
    assert sorted(index.ids().tolist()) == [2, 3, 3, 4]
    assert index.search(keys[[3, 4, 5, 6]])[1][:, 0].tolist() == [2, 3, 3, 4]  # moved rows still map right
    index.add([3], keys[:1])  # replacing: edit 3 now has one key
    assert sorted(index.ids().tolist()) == [2, 3, 4]
    assert index.search(keys[:1])[1][0, 0] == 3
    rebuilt = KeyIndex.from_matrix(ids, keys.copy(), "cosine", backend)
    rebuilt.remove([3])
    assert sorted(rebuilt.ids().tolist()) == [1, 1, 1, 2, 4, 5, 5]


def test_non_finite_query_rows_find_nothing():
    index, keys, ids = filled("cosine", "faiss", n=20)
    queries = keys[:2].copy()
    queries[1, 3] = np.nan
    dist, found = index.search(queries)
    assert found[:, 0].tolist() == [ids[0], -1] and np.isinf(dist[1, 0])


def test_bad_input_is_a_clear_error():
    index = KeyIndex(DIM, "cosine", "torch")
    with pytest.raises(ValidationError, match=r"queries must have shape \(n, 24\), got \(24,\)"):
        index.search(np.zeros(DIM))
    with pytest.raises(ValidationError, match=r"shape \(n, 24\), got \(2, 5\)"):
        index.search(torch.zeros(2, 5))
    with pytest.raises(ValidationError, match="NaN"):
        index.add([1], np.full((1, DIM), np.inf))
    with pytest.raises(ValidationError, match="metric"):
        KeyIndex(DIM, "dot")
    if not index_module._GPU_FAISS:
        with pytest.raises(ValidationError, match="no GPU support.*backend='torch'"):
            KeyIndex(DIM, "cosine", "faiss", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_faiss():
    faiss_index, keys, ids = filled("l2", "faiss")
    cuda_index = KeyIndex(DIM, "l2", "torch", device="cuda")
    cuda_index.add(ids, keys)
    queries = torch.randn(16, DIM, device="cuda")
    dist, found = cuda_index.search(queries, k=2)
    assert found.device.type == "cuda"
    want_dist, want_ids = faiss_index.search(queries.cpu().numpy(), k=2)
    np.testing.assert_array_equal(found.cpu().numpy(), want_ids)


@pytest.mark.skipif(not (index_module._GPU_FAISS and torch.cuda.is_available()),
                    reason="needs faiss with GPU support and CUDA")
def test_faiss_gpu_matches_faiss_cpu():
    cpu_index, keys, ids = filled("cosine", "faiss")
    gpu_index = KeyIndex(DIM, "cosine", "faiss", device="cuda")
    gpu_index.add(ids, keys)
    queries = torch.randn(16, DIM, device="cuda")
    _, found = gpu_index.search(queries, k=2)
    np.testing.assert_array_equal(found.cpu().numpy(), cpu_index.search(queries.cpu().numpy(), k=2)[1])


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_near_earlier_finds_exactly_the_sets_an_earlier_one_lies_near(metric):
    """What a batch insert skips the pending search for must be what that search would have found beyond reach."""
    from registry.nearest import near_earlier

    rng = np.random.default_rng(0)
    sets = [rng.standard_normal((1 + i % 3, 16)).astype(np.float32) for i in range(3000)]
    sets[2999] = np.stack([rng.standard_normal(16), sets[5][1] + 1e-4]).astype(np.float32)  # far apart in the batch
    sets[40] = sets[7][:1] * (1 if metric == "l2" else 3.0)  # cosine: the same direction, another length
    within = 0.01 if metric == "cosine" else 0.05
    found = near_earlier(sets, within, metric, rows=256)  # several blocks
    index = KeyIndex(16, metric)
    brute = set()
    for i, keys in enumerate(sets):
        if len(index) and index.search(keys, 1)[0].min() <= within:
            brute.add(i)
        index.add([i] * len(keys), keys)
    assert found == brute == {40, 2999}
