"""Device paths: fp16 keys with exact rescoring, torch search and the adapter cache on CUDA, FAISS GPU.

The fp16 tests also run on the CPU (torch has fp16 matmul there), so the rescoring logic is always covered;
everything that needs CUDA, or a faiss built with GPU support, skips cleanly without it.
"""
import numpy as np
import pytest
import torch
from registry_helpers import make_adapter, make_config, make_key

from registry import AdapterCache, EditRegistry, KeyIndex, ValidationError
from registry import index as index_module

DIM = 48
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FAISS_GPU = pytest.mark.skipif(not (index_module._GPU_FAISS and torch.cuda.is_available()),
                               reason="needs faiss with GPU support and CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def clustered_keys(n: int, seed: int, spread: float) -> np.ndarray:
    """Keys in tight clusters: many near ties, so fp16 rounding alone would pick wrong neighbours."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), DIM)).astype(np.float32)
    return centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)


def exact(keys: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int):
    """float64 brute force: nearest ids by cosine distance."""
    unit = lambda x: x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    dist = 1.0 - unit(queries) @ unit(keys).T
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, 1), ids[order]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spread", [1.0, 1e-2])
def test_fp16_keys_give_the_exact_nearest_neighbours(device, spread):
    keys = clustered_keys(3000, seed=0, spread=spread)
    ids = np.arange(3000, dtype=np.int64) * 7 + 1
    index = KeyIndex(DIM, "cosine", "torch", device=device, capacity=16, key_dtype="float16")
    index.add(ids, keys)
    queries = keys[np.random.default_rng(1).integers(0, 3000, 40)]
    queries = queries + 0.5 * spread * np.random.default_rng(2).standard_normal(queries.shape).astype(np.float32)
    dist, found = index.search(torch.from_numpy(queries).to(device), k=2)
    want_dist, want_ids = exact(keys, ids, queries, 2)
    np.testing.assert_allclose(dist.cpu().numpy(), want_dist, atol=1e-5)  # float32 distances, not fp16 ones
    gap = want_dist[:, 1] - want_dist[:, 0]
    clear = gap > 1e-5  # where float32 itself can tell the two apart
    np.testing.assert_array_equal(found.cpu().numpy()[clear, 0], want_ids[clear, 0])


def test_fp16_index_keeps_its_float32_copy_through_removals_and_growth():
    keys = clustered_keys(500, seed=3, spread=1e-2)
    ids = np.arange(500, dtype=np.int64)
    half = KeyIndex(DIM, "cosine", "torch", capacity=4, key_dtype="float16")
    full = KeyIndex(DIM, "cosine", "faiss", capacity=4)
    for index in (half, full):
        index.add(ids, keys)
        index.remove(ids[::3])
        index.add([10_000], keys[:1] * 2)
    queries = clustered_keys(30, seed=4, spread=1e-2)
    h_dist, h_ids = half.search(queries, k=3)
    f_dist, f_ids = full.search(queries, k=3)
    np.testing.assert_allclose(h_dist, f_dist, atol=1e-5)
    assert set(half.ids().tolist()) == set(full.ids().tolist())
    assert half.key_dtype == "float16" and half.nbytes > full.nbytes  # fp16 keys beside a float32 copy


def test_fp16_needs_torch_and_cosine():
    with pytest.raises(ValidationError, match="float16 keys need backend='torch' and metric='cosine'"):
        KeyIndex(DIM, "cosine", "faiss", key_dtype="float16")
    with pytest.raises(ValidationError, match="float16 keys need"):
        KeyIndex(DIM, "l2", "torch", key_dtype="float16")
    with pytest.raises(ValidationError, match="key_dtype must be one of float32, float16"):
        KeyIndex(DIM, "cosine", "torch", key_dtype="int8")


def test_memory_held_is_reported():
    index = KeyIndex(DIM, "cosine", "torch", capacity=100)
    assert index.nbytes == 100 * DIM * 4 + 100 * 8
    config = make_config()
    cache = AdapterCache(config.layers, config.rank, 5, loader=lambda ids: {})
    assert cache.nbytes == 5 * 4 * sum(config.rank * (layer.in_features + layer.out_features) for layer in config.layers)


@CUDA
@pytest.mark.parametrize("key_dtype", ["float32", "float16"])
def test_torch_search_on_cuda_matches_faiss_cpu(key_dtype):
    keys = clustered_keys(2000, seed=5, spread=1.0)
    ids = np.arange(2000, dtype=np.int64)
    cpu = KeyIndex(DIM, "cosine", "faiss")
    cuda = KeyIndex(DIM, "cosine", "torch", device="cuda", key_dtype=key_dtype)
    cpu.add(ids, keys)
    cuda.add(ids, keys)
    queries = torch.randn(32, DIM, device="cuda")
    dist, found = cuda.search(queries, k=1)
    assert found.device.type == "cuda" and dist.device.type == "cuda"
    want_dist, want_ids = cpu.search(queries.cpu().numpy(), k=1)
    np.testing.assert_array_equal(found.cpu().numpy(), want_ids)
    np.testing.assert_allclose(dist.cpu().numpy(), want_dist, atol=1e-5)


@CUDA
def test_adapter_cache_on_cuda_serves_stacked_device_tensors():
    config = make_config()
    cache = AdapterCache(config.layers, config.rank, 4, device="cuda",
                         loader=lambda ids: {i: make_adapter(config, seed=i) for i in ids})
    slots = cache.slots([3, 9, 3])
    A, B = cache.tensors(0)
    assert slots.device.type == A.device.type == B.device.type == "cuda"
    assert torch.equal(A[slots[1]].cpu(), make_adapter(config, seed=9)["0.A"])
    assert torch.equal(B[slots[0]].cpu(), make_adapter(config, seed=3)["0.B"])


@pytest.mark.parametrize("device", DEVICES)
def test_registry_with_fp16_keys_finds_what_float32_finds(tmp_path, device):
    """RuntimeConfig(key_dtype="float16") reaches the registry's index: same answers, half the scanned bytes."""
    config = make_config()
    with EditRegistry.create(tmp_path / "r", config, backend="torch", device=device) as reg:
        reg.add_many([{"prompt": f"p{i}", "target": "t", "keys": make_key(i), "adapter": make_adapter(config)}
                      for i in range(200)], check_conflicts=False)
        reg.rollback(7)
    queries = np.stack([make_key(i) for i in range(0, 200, 3)] + [make_key(999)])
    answers = {}
    for key_dtype in ("float32", "float16"):
        with EditRegistry.open(tmp_path / "r", backend="torch", device=device, key_dtype=key_dtype) as reg:
            dist, ids = reg.nearest(torch.from_numpy(queries).to(device))
            answers[key_dtype] = (dist.cpu().numpy(), ids.cpu().numpy())
            assert reg.key_index.key_dtype == key_dtype
    np.testing.assert_array_equal(answers["float16"][1], answers["float32"][1])
    np.testing.assert_allclose(answers["float16"][0], answers["float32"][0], atol=1e-5)


@CUDA
def test_registry_matches_on_cuda_queries(tmp_path):
    config = make_config()
    with EditRegistry.create(tmp_path / "r", config, backend="torch", device="cuda") as reg:
        eid = reg.add("p", "t", make_key(1), make_adapter(config))
        queries = torch.from_numpy(np.stack([make_key(1), make_key(2)])).cuda()
        ids = reg.match(queries)
        assert ids.device.type == "cuda" and ids.tolist() == [eid, -1]
        reg.rollback(eid)  # its key becomes a tombstone, searched on the GPU too
        assert reg.match(queries).tolist() == [-1, -1]


@FAISS_GPU
def test_faiss_gpu_search_matches_faiss_cpu():
    keys = clustered_keys(1000, seed=6, spread=1.0)
    ids = np.arange(1000, dtype=np.int64)
    cpu, gpu = KeyIndex(DIM, "cosine", "faiss"), KeyIndex(DIM, "cosine", "faiss", device="cuda")
    cpu.add(ids, keys)
    gpu.add(ids, keys)
    queries = torch.randn(16, DIM, device="cuda")
    _, found = gpu.search(queries, k=1)
    np.testing.assert_array_equal(found.cpu().numpy(), cpu.search(queries.cpu().numpy(), k=1)[1])


@CUDA
def test_editor_serves_a_mixed_batch_on_cuda(tmp_path, llama, tokenizer):
    """End to end on the device: routed rows change, the others stay bit-identical to the unedited model."""
    from sola_core import EditConfig, RuntimeConfig, SolaEditor

    model = llama.cuda()
    prompts = ["The capital of France is", "Hello, how are you today?"]
    runtime = RuntimeConfig(device="cuda", backend="torch")
    config = EditConfig(threshold=1e-4)  # a random model's distinct prompts sit far further apart
    with SolaEditor.open(tmp_path / "r", model, tokenizer, config=config, runtime=runtime) as editor:
        before = editor.logits(prompts)  # no edits yet: the unedited model's logits
        config = editor.registry.config
        gen = torch.Generator().manual_seed(0)
        adapter = {"0.A": torch.randn(config.rank, config.layers[0].in_features, generator=gen),
                   "0.B": torch.randn(config.layers[0].out_features, config.rank, generator=gen)}
        eid = editor.registry.add(prompts[0], " x", editor.key(prompts[0]).cpu().numpy(), adapter)
        assert editor.route(prompts) == [eid, None]
        after = editor.logits(prompts)
    assert after.device.type == "cuda"
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
