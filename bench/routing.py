"""Routing: exact k=1 nearest-key search latency against N active keys, per backend, vs the memory bound.

    python bench/routing.py            # N up to 1M, dims 576 and 4096, batch 1 and 32 (~4 min on 2 cores)
    python bench/routing.py --quick    # seconds

Each backend is the library's own ``registry.KeyIndex`` (what the edited layer calls): FAISS flat search on
the CPU, torch matmul + topk on the CPU, torch with fp16 keys (exact float32 rescoring of the candidates),
and, when present, the same torch paths on CUDA and FAISS GPU. A search reads every key once, so its floor
is (key bytes) / (memory bandwidth of this machine), or the matmul's FLOPs / peak matmul rate when a batch
makes it compute-bound; the table reports measured / bound.
"""
from __future__ import annotations

import gc

from common import clock, machine, memory_bandwidth, parse_args, pyplot, save, save_plot, summary, total_ram

import numpy as np
import torch
from tqdm import tqdm

from registry import KeyIndex
from registry import index as index_module

# -- config ------------------------------------------------------------------------------------------
NS = [1_000, 10_000, 100_000, 1_000_000]
DIMS = [576, 4096]  # SmolLM2's hidden size; a 7B-class model's
BATCHES = [1, 32]
SECONDS_PER_POINT = 1.5  # time each (backend, N, dim, batch) for about this long ...
MIN_REPS, MAX_REPS = 10, 300  # ... but at least / at most this many searches
MEMORY_SHARE = 0.4  # skip a backend whose keys (plus its build copy) exceed this share of RAM

args = parse_args(__doc__)
if args.quick:
    NS, DIMS, SECONDS_PER_POINT, MIN_REPS, MAX_REPS = [500, 2_000], [64], 0.02, 3, 10


def backends() -> dict[str, dict]:
    """name -> KeyIndex arguments, for every backend this machine can run."""
    found = {"faiss-cpu": dict(backend="faiss"), "torch-cpu": dict(backend="torch"),
             "torch-cpu-fp16": dict(backend="torch", key_dtype="float16")}
    if torch.cuda.is_available():
        found["torch-cuda"] = dict(backend="torch", device="cuda")
        found["torch-cuda-fp16"] = dict(backend="torch", device="cuda", key_dtype="float16")
        if index_module._GPU_FAISS:
            found["faiss-gpu"] = dict(backend="faiss", device="cuda")
    return found


def host_bytes(name: str, n: int, dim: int) -> int:
    """Host memory a backend needs for n keys: the keys, the normalised copy made while adding, fp32 rescoring copy."""
    fp32 = n * dim * 4
    if name.endswith("fp16"):
        return fp32 * 2 + (0 if "cuda" in name else fp32 // 2)
    return fp32 * (1 if "cuda" in name or "gpu" in name else 2)


def unit_keys(n: int, dim: int, seed: int) -> np.ndarray:
    """Random unit keys, made a chunk at a time (torch's generator: 5x numpy's here) to bound temporary memory."""
    gen = torch.Generator().manual_seed(seed)
    keys = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):
        block = torch.randn(min(65536, n - start), dim, generator=gen)
        keys[start:start + len(block)] = (block / block.norm(dim=1, keepdim=True)).numpy()
    return keys


def peak_matmul_flops(dim: int = 2048) -> float:
    a, b = torch.randn(dim, dim), torch.randn(dim, dim)
    a @ b
    return 2 * dim ** 3 / min(clock(lambda: a @ b) for _ in range(5))


def time_search(index: KeyIndex, queries: torch.Tensor, batch: int) -> list[float]:
    """Search successive slices of the query pool for about SECONDS_PER_POINT."""
    pool = [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    index.search(pool[0], 1)  # warm-up
    times: list[float] = []
    while len(times) < MAX_REPS and (len(times) < MIN_REPS or sum(times) < SECONDS_PER_POINT):
        q = pool[len(times) % len(pool)]
        times.append(clock(lambda: index.search(q, 1)))
    return times


def fp16_scan_only(keys16: torch.Tensor, queries: torch.Tensor, batch: int) -> list[float]:
    """The scan of the fp16 backend without its float32 rescoring copy, for sizes whose copy does not fit."""
    q = queries[:batch].half()
    times = []
    while len(times) < MIN_REPS and sum(times) < SECONDS_PER_POINT * 4:
        times.append(clock(lambda: (q @ keys16.T).topk(1, dim=1)))
    return times


# -- run ---------------------------------------------------------------------------------------------
info = machine()
bandwidth = memory_bandwidth(1 << 26 if args.quick else 1 << 30)
flops = peak_matmul_flops(512 if args.quick else 2048)
budget = MEMORY_SHARE * total_ram()
print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e9:.0f} GFLOP/s, key budget {budget / 2**30:.1f} GiB")
rows, skipped = [], []
todo = [(dim, n, name) for dim in DIMS for n in NS for name in backends()]
bar = tqdm(total=len(todo), desc="routing")
for dim in DIMS:
    queries = torch.from_numpy(unit_keys(max(BATCHES) * 8, dim, seed=1))
    for n in NS:
        fits = {name: host_bytes(name, n, dim) <= budget for name in backends()}
        keys = unit_keys(n, dim, seed=0) if any(fits.values()) else None
        for name, kwargs in backends().items():
            bar.set_postfix_str(f"{name} N={n} d={dim}")
            bar.update()
            if not fits[name]:
                skipped.append({"backend": name, "n": n, "dim": dim, "needs_gb": round(host_bytes(name, n, dim) / 1e9, 1)})
                continue
            index = KeyIndex(dim, "cosine", capacity=n, **kwargs)
            index.add(np.arange(n), keys)
            key_bytes = n * dim * (2 if name.endswith("fp16") else 4)
            for batch in BATCHES:
                q = queries.to(index.device)
                stats = summary(time_search(index, q, batch))
                bound_s = max(key_bytes / bandwidth, 2 * batch * n * dim / flops)
                rows.append({"backend": name, "n": n, "dim": dim, "batch": batch, **stats,
                             "key_bytes": key_bytes, "bound_ms": bound_s * 1e3,
                             "memory_bound_ms": key_bytes / bandwidth * 1e3,
                             "measured_over_bound": stats["p50_ms"] / (bound_s * 1e3)})
            del index
            gc.collect()
        if keys is None and n * dim * 2 <= budget:  # no backend fits: time the fp16 scan alone (labelled)
            keys16 = torch.empty(n, dim, dtype=torch.float16)
            for start in range(0, n, 65536):
                keys16[start:start + 65536] = torch.from_numpy(unit_keys(min(65536, n - start), dim, seed=start))
            for batch in BATCHES:
                stats = summary(fp16_scan_only(keys16, queries, batch))
                bound_s = max(n * dim * 2 / bandwidth, 2 * batch * n * dim / flops)
                rows.append({"backend": "torch-cpu-fp16-scan-only", "n": n, "dim": dim, "batch": batch, **stats,
                             "key_bytes": n * dim * 2, "bound_ms": bound_s * 1e3,
                             "memory_bound_ms": n * dim * 2 / bandwidth * 1e3,
                             "measured_over_bound": stats["p50_ms"] / (bound_s * 1e3)})
            del keys16
        del keys
        gc.collect()
bar.close()

save(args.out, "routing", {"machine": info, "bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
                           "config": {"ns": NS, "dims": DIMS, "batches": BATCHES, "memory_share": MEMORY_SHARE},
                           "rows": rows, "skipped": skipped})

plt = pyplot()
fig, axes = plt.subplots(1, len(DIMS), figsize=(6 * len(DIMS), 4.5), squeeze=False)
for ax, dim in zip(axes[0], DIMS):
    for name in dict.fromkeys(r["backend"] for r in rows):
        for batch, style in zip(BATCHES, ("-o", "--s")):
            pts = [r for r in rows if r["backend"] == name and r["dim"] == dim and r["batch"] == batch]
            if pts:
                ax.plot([r["n"] for r in pts], [r["p50_ms"] for r in pts], style, label=f"{name} b{batch}")
    ns = sorted({r["n"] for r in rows if r["dim"] == dim})
    ax.plot(ns, [n * dim * 4 / bandwidth * 1e3 for n in ns], ":k", label="fp32 bytes / bandwidth")
    ax.set(xscale="log", yscale="log", xlabel="active keys N", ylabel="p50 search latency (ms)", title=f"dim {dim}")
    ax.legend(fontsize=7)
save_plot(fig, args.out, "routing")
for r in rows:
    print(f"{r['backend']:>24} N={r['n']:>8} d={r['dim']:>4} b={r['batch']:>2}  p50 {r['p50_ms']:8.2f} ms  "
          f"p99 {r['p99_ms']:8.2f} ms  bound {r['bound_ms']:7.2f} ms  x{r['measured_over_bound']:.2f}")
for s in skipped:
    print(f"skipped {s['backend']} N={s['n']} d={s['dim']}: needs {s['needs_gb']} GB")
