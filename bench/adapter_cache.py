"""Adapter cache: hit rate and added latency of 1k LRU slots under a Zipf workload over 100k stored edits.

    python bench/adapter_cache.py          # 100k edits (SmolLM2 shape, ~4.6 GB temp registry), ~1 min
    python bench/adapter_cache.py --quick  # seconds

The cache is the library's ``registry.AdapterCache`` on the device the model would use (CUDA when present),
filled from a real LMDB registry through ``EditRegistry.adapters``, exactly as ``SolaEditor`` wires it.
Each batch has ROWS routed rows whose edits are drawn from a Zipf law over the N edits (rank r with
probability proportional to r^-s, ranks shuffled over ids). Per batch we time what the edited layer adds
for adapters: ``cache.slots(ids)`` (LRU bookkeeping, plus one LMDB read transaction for all of the batch's
misses) and the gather of the rows' stacked A/B. Rows that hit do no I/O; a batch with misses waits for
them, because the layer that routes is the layer that applies the delta (the key is its input).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import clock, machine, parse_args, pyplot, save, save_plot, summary, synthetic_edits

import numpy as np
import torch
from tqdm import tqdm

from registry import AdapterCache, EditRegistry, LayerSpec, RegistryConfig

# -- config ------------------------------------------------------------------------------------------
N = 100_000
SLOTS = 1_000
ROWS = 16  # routed rows per batch
ZIPF_S = [0.8, 1.0, 1.2]  # Zipf exponents: 1.0 is the classic web/cache workload
BATCHES = 3_000  # timed batches per exponent, after WARMUP batches that fill the cache
WARMUP = 300
LAYERS = [LayerSpec("model.layers.24.mlp.down_proj", 1536, 576)]  # SmolLM2's edited layer
KEY_DIM, RANK = 1536, 4
WORKDIR = None

args = parse_args(__doc__, workdir=(str, WORKDIR, "where to create the temporary registry"))
if args.quick:
    N, SLOTS, ZIPF_S, BATCHES, WARMUP = 500, 50, [1.0], 50, 10
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def zipf_ids(n: int, s: float, count: int, seed: int) -> np.ndarray:
    """``count`` edit ids (1..n) whose popularity ranks follow Zipf(s); rank order shuffled over ids."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n + 1) ** s
    ranks = rng.choice(n, size=count, p=p / p.sum())
    return rng.permutation(n)[ranks] + 1


def batch_cost(cache: AdapterCache, ids: list[int]) -> None:
    """What the edited layer does for adapters: slots (loading misses) and the per-row gather."""
    slots = cache.slots(ids)
    for layer in range(len(LAYERS)):
        A, B = cache.tensors(layer)
        A[slots], B[slots]  # (m, r, in), (m, out, r)


# -- setup -------------------------------------------------------------------------------------------
info = machine()
cfg = RegistryConfig(key_dim=KEY_DIM, layers=LAYERS, rank=RANK, alpha=4.0, metric="cosine", threshold=0.01,
                     key_source="layer", fingerprint={"model": "synthetic"})
tmp = tempfile.TemporaryDirectory(prefix="sola-bench-cache-", dir=args.workdir)
reg = EditRegistry.create(Path(tmp.name) / "registry", cfg)
build_s = clock(lambda: reg.add_many(tqdm(synthetic_edits(cfg, N), total=N, desc="registering"), check_conflicts=False))
loads: list[tuple[int, float]] = []  # (adapters, seconds) per loader call


def timed_loader(ids: list[int]) -> dict:
    box: dict = {}
    loads.append((len(ids), clock(lambda: box.setdefault("a", reg.adapters(ids)))))
    return box["a"]


# -- run ---------------------------------------------------------------------------------------------
rows, curves = [], {}
for s in ZIPF_S:
    cache = AdapterCache(cfg.layers, cfg.rank, SLOTS, loader=timed_loader, device=device)
    stream = zipf_ids(N, s, (WARMUP + BATCHES) * ROWS, seed=int(s * 100)).reshape(-1, ROWS).tolist()
    for ids in stream[:WARMUP]:
        batch_cost(cache, ids)
    loads.clear()
    before = cache.stats()
    times, missed = [], []
    for ids in tqdm(stream[WARMUP:], desc=f"zipf s={s}"):
        misses = cache.stats()["misses"]
        times.append(clock(lambda: batch_cost(cache, ids)))
        missed.append(cache.stats()["misses"] - misses)
    after = cache.stats()
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    times, missed = np.asarray(times), np.asarray(missed)
    curves[s] = np.sort(times) * 1e3
    load_n = sum(n for n, _ in loads)
    rows.append({"s": s, "hit_rate": hits / (hits + misses), "distinct_lookups": hits + misses,
                 "batches": BATCHES, "batches_with_misses": int((missed > 0).sum()),
                 "added_ms": summary(times.tolist()),
                 "added_ms_all_hits": summary(times[missed == 0].tolist()) if (missed == 0).any() else None,
                 "added_ms_with_misses": summary(times[missed > 0].tolist()) if (missed > 0).any() else None,
                 "load_us_per_adapter": (sum(t for _, t in loads) / load_n * 1e6) if load_n else None,
                 "mean_misses_per_batch": float(missed.mean())})
    r = rows[-1]
    tqdm.write(f"s={s}: hit rate {r['hit_rate']:.3f}, added p50 {r['added_ms']['p50_ms']:.3f} ms "
               f"p99 {r['added_ms']['p99_ms']:.3f} ms, {r['mean_misses_per_batch']:.2f} misses/batch, "
               f"{r['load_us_per_adapter'] or 0:.0f} us per loaded adapter")
reg.close()
tmp.cleanup()

save(args.out, "adapter_cache", {"machine": info, "device": str(device),
                                 "config": {"n": N, "slots": SLOTS, "rows_per_batch": ROWS, "zipf_s": ZIPF_S,
                                            "batches": BATCHES, "warmup": WARMUP, "key_dim": KEY_DIM, "rank": RANK,
                                            "layers": [vars(x) for x in LAYERS]},
                                 "build_s": build_s, "rows": rows})

plt = pyplot()
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].bar([str(r["s"]) for r in rows], [r["hit_rate"] for r in rows])
axes[0].set(xlabel="Zipf exponent s", ylabel="hit rate (distinct ids per batch)", ylim=(0, 1),
            title=f"{SLOTS} slots over {N} edits")
for s_, ms in curves.items():
    axes[1].plot(ms, np.arange(1, len(ms) + 1) / len(ms), label=f"s={s_}")
axes[1].set(xscale="log", xlabel=f"added ms per batch of {ROWS} routed rows", ylabel="fraction of batches",
            title="adapter resolution latency (CDF)")
axes[1].legend()
save_plot(fig, args.out, "adapter_cache")
