"""Registry operations against N stored edits: add, rollback, restore, cold open, verify; disk and peak RSS.

    python bench/registry_ops.py           # N = 1k, 10k, 100k (SmolLM2 shapes) and 1M (smaller shape), ~12 min
    python bench/registry_ops.py --quick   # seconds

No model is involved: edits are random keys and adapters registered through ``EditRegistry.add_many``.
Three registries are grown step by step and measured at each N:

* "smollm2": what ``SolaEditor`` makes for SmolLM2 by default (the encoder key: 384 floats; a rank-4
  adapter on the 1536->576 down_proj: 33,792 raw adapter bytes per edit), up to 100k edits (~4 GB);
* "smollm2-layer-key": the same with the paper's in-layer key (``--key-source layer``: the down_proj input,
  1536 floats), up to 100k edits (~4.6 GB);
* "small": key 576 floats, rank-1 adapter on a 576->576 layer (4,608 raw adapter bytes), up to 1M edits,
  so that a million edits fit in ~13 GB of disk. Its disk ratio is NOT the SmolLM2 one: LMDB stores each
  value over ~2 KB in whole 4 KiB pages, which costs a small value relatively more.

"Cold open" is a fresh ``EditRegistry.open`` plus the first search (which builds the key index) in this
process, with the operating system's page cache warm (dropping it needs root and disturbs other jobs).
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

from common import PeakRSS, clock, disk_usage, machine, parse_args, pyplot, save, save_plot, summary, synthetic_edits

import numpy as np
from tqdm import tqdm

from registry import EditRegistry, LayerSpec, RegistryConfig
from registry.codec import adapter_nbytes

# -- config ------------------------------------------------------------------------------------------
SHAPES = {
    "smollm2": dict(key_dim=384, layers=[LayerSpec("model.layers.24.mlp.down_proj", 1536, 576)], rank=4, ns=[1_000, 10_000, 100_000]),
    "smollm2-layer-key": dict(key_dim=1536, layers=[LayerSpec("model.layers.24.mlp.down_proj", 1536, 576)], rank=4,
                              ns=[1_000, 10_000, 100_000]),
    "small": dict(key_dim=576, layers=[LayerSpec("small.proj", 576, 576)], rank=1, ns=[1_000, 10_000, 100_000, 1_000_000]),
}
OPS = 20  # timed adds, rollbacks and restores per point
OPENS = 3  # timed cold opens per point
VERIFY_UP_TO = 1_000_000  # verify reads every edit: skip above this N
TARGETS = {"rollback_ms": 10.0, "open_s": 5.0, "disk_over_adapter": 1.2}  # at 100k edits (issue 4)
WORKDIR = None

args = parse_args(__doc__, workdir=(str, WORKDIR, "where to create the temporary registries"))
if args.quick:
    for shape in SHAPES.values():
        shape["ns"] = [100, 300]
    OPS, OPENS = 3, 2


def config_for(shape: dict) -> RegistryConfig:
    return RegistryConfig(key_dim=shape["key_dim"], layers=shape["layers"], rank=shape["rank"], alpha=4.0,
                          metric="cosine", threshold=0.01, key_source="layer", fingerprint={"model": "synthetic"})


def fsync_floor(folder: Path, reps: int = 20) -> dict:
    """Latency of one durable 4 KiB write on this disk: the floor under any committed write transaction."""
    path = folder / "fsync-probe"
    with open(path, "wb") as f:
        def write() -> None:
            f.write(b"\0" * 4096)
            f.flush()
            os.fdatasync(f.fileno())

        times = [clock(write) for _ in range(reps)]
    path.unlink()
    return summary(times)


def timed_each(ids: list[int], op) -> list[float]:
    return [clock(lambda: op(edit_id)) for edit_id in ids]


def cold_open(path: Path, dim: int) -> tuple[float, EditRegistry]:
    """Seconds for open + first search (index build), and the opened registry."""
    box: dict = {}

    def run() -> None:
        box["reg"] = EditRegistry.open(path)
        box["reg"].nearest(np.zeros((1, dim), np.float32))

    return clock(run), box["reg"]


def measure(reg: EditRegistry, path: Path, cfg: RegistryConfig, n: int, extra: list[dict]) -> tuple[dict, EditRegistry]:
    """All operations at the registry's current size; returns the row and the (re-opened) registry."""
    row: dict = {"n": n}
    reg.nearest(np.zeros((1, cfg.key_dim), np.float32))  # index built before timing adds
    row["add"] = summary([clock(lambda: reg.add(**item)) for item in extra])
    victims = random.Random(n).sample(range(1, n + 1), OPS)
    row["rollback"] = summary(timed_each(victims, reg.rollback))
    row["restore"] = summary(timed_each(victims, reg.restore))
    reg.close()
    opens = []
    for _ in range(OPENS):
        with PeakRSS() as rss:
            seconds, reg = cold_open(path, cfg.key_dim)
        opens.append(seconds)
        row["open_peak_rss_bytes"], row["open_peak_anon_bytes"] = rss.peak, rss.peak_anon
        if len(opens) < OPENS:
            reg.close()
    row["open"] = summary(opens)
    if n <= VERIFY_UP_TO:
        with PeakRSS() as rss:
            box: dict = {}
            row["verify_s"] = clock(lambda: box.setdefault("report", reg.verify()))
        row["verify_ok"], row["verify_peak_rss_bytes"] = box["report"].ok, rss.peak
        row["verify_peak_anon_bytes"] = rss.peak_anon
    stats = reg.stats()
    edits = stats["total"]
    row.update(edits=edits, data_file_bytes=stats["disk_bytes"], disk_bytes=disk_usage(path),
               adapter_bytes=adapter_nbytes(cfg), key_bytes=cfg.key_dim * 4)
    row["disk_per_edit"] = row["disk_bytes"] / edits
    row["disk_over_adapter"] = row["disk_per_edit"] / row["adapter_bytes"]
    row["disk_over_adapter_and_key"] = row["disk_per_edit"] / (row["adapter_bytes"] + row["key_bytes"])
    return row, reg


# -- run ---------------------------------------------------------------------------------------------
info = machine()
results: dict[str, list[dict]] = {}
for name, shape in SHAPES.items():
    cfg = config_for(shape)
    tmp = tempfile.TemporaryDirectory(prefix=f"sola-bench-ops-{name}-", dir=args.workdir)
    path = Path(tmp.name) / "registry"
    reg = EditRegistry.create(path, cfg)
    fsync = fsync_floor(Path(tmp.name))
    rows = []
    for n in tqdm(shape["ns"], desc=f"registry ops ({name})"):
        before = reg.count()
        with PeakRSS() as rss:
            build = clock(lambda: reg.add_many(synthetic_edits(cfg, n - before, seed=n), check_conflicts=False))
        extra = list(synthetic_edits(cfg, OPS, seed=n + 1))
        row, reg = measure(reg, path, cfg, n, extra)
        row.update(fsync=fsync, build_s=build, build_edits=n - before, build_peak_rss_bytes=rss.peak, build_peak_anon_bytes=rss.peak_anon,
                   build_us_per_edit=build / (n - before) * 1e6)
        rows.append(row)
        tqdm.write(f"{name} N={n}: add {row['add']['p50_ms']:.2f} ms, rollback {row['rollback']['p50_ms']:.2f} ms, "
                   f"restore {row['restore']['p50_ms']:.2f} ms, open {row['open']['p50_ms'] / 1e3:.2f} s, "
                   f"verify {row.get('verify_s', float('nan')):.1f} s, disk/edit {row['disk_per_edit']:.0f} B "
                   f"({row['disk_over_adapter']:.2f}x adapter, {row['disk_over_adapter_and_key']:.2f}x adapter+key)")
    reg.close()
    tmp.cleanup()
    results[name] = rows

targets = []
for name, label in (("smollm2", "SmolLM2, encoder key (default)"), ("smollm2-layer-key", "SmolLM2, layer key")):
    ref = next((r for r in results[name] if r["n"] == 100_000), None)
    if ref is None:
        continue
    measured = {"rollback_ms": ref["rollback"]["p50_ms"], "open_s": ref["open"]["p50_ms"] / 1e3,
                "disk_over_adapter": ref["disk_over_adapter"]}
    for key, what in (("rollback_ms", "rollback p50 at 100k (ms)"), ("open_s", "cold open at 100k (s)"),
                      ("disk_over_adapter", "disk / raw adapter bytes at 100k")):
        targets.append({"what": f"{what}, {label}", "shape": name, "target": TARGETS[key], "measured": measured[key],
                        "met": measured[key] <= TARGETS[key]})
    targets.append({"what": f"disk at 1M, EXTRAPOLATED from 100k (GB), {label}", "shape": name,
                    "measured": ref["disk_per_edit"] * 1e6 / 1e9})
save(args.out, "registry_ops", {"machine": info, "config": {name: {**s, "layers": [vars(x) for x in s["layers"]]}
                                                            for name, s in SHAPES.items()},
                                "ops": OPS, "opens": OPENS, "results": results, "targets": targets})

plt = pyplot()
fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for name, rows in results.items():
    ns = [r["n"] for r in rows]
    for op, style in (("add", "-o"), ("rollback", "-s"), ("restore", "-^"), ("open", "--d")):
        axes[0].plot(ns, [r[op]["p50_ms"] for r in rows], style, label=f"{op} ({name})")
    axes[1].plot(ns, [r["disk_over_adapter"] for r in rows], "-o", label=f"disk / raw adapter ({name})")
axes[0].set(xscale="log", yscale="log", xlabel="edits N", ylabel="p50 (ms)", title="registry operations")
axes[1].axhline(TARGETS["disk_over_adapter"], color="r", lw=0.8)
axes[1].set(xscale="log", xlabel="edits N", ylabel="bytes on disk per edit / raw adapter bytes", title="disk")
for ax in axes:
    ax.legend(fontsize=7)
save_plot(fig, args.out, "registry_ops")
for t in targets:
    print(t)
