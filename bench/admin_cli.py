"""Admin commands' wall time (issue 14, item 5): `sola list/show/stats/verify/rollback/restore/export` as real
subprocesses on a 10k-edit registry, medians of several runs, and which heavy modules each one imported.

    python bench/admin_cli.py           # 10k SmolLM2-shaped edits, 5 runs per command (~1 min)
    python bench/admin_cli.py --quick   # 300 edits, 2 runs

A command's time is everything a user waits for: interpreter start-up, imports, opening the registry, the
work and the output. Which heavy modules it imported comes from one more run under `python -X importtime`
(not timed: the trace itself slows imports down).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from common import ROOT, machine, parse_args, pyplot, save, save_plot, synthetic_edits

from registry import EditRegistry, LayerSpec, RegistryConfig

# -- config ------------------------------------------------------------------------------------------
N = 10_000
RUNS = 5
HEAVY = ("torch", "transformers", "faiss")

args = parse_args(__doc__)
if args.quick:
    N, RUNS = 300, 2


def config() -> RegistryConfig:
    layer = LayerSpec("model.layers.24.mlp.down_proj", 1536, 576)
    return RegistryConfig(key_dim=384, layers=[layer], rank=4, alpha=4.0, metric="cosine", threshold=0.15,
                          key_source="encoder", fingerprint={"model": "synthetic"})


def commands(export_to: str) -> dict[str, list[str]]:
    return {"list --json": ["list", "--json"], "list --limit 20": ["list", "--limit", "20"],
            "show 1 --json": ["show", "1", "--json"], "stats --json": ["stats", "--json"],
            "verify --json": ["verify", "--json"], "rollback 2": ["rollback", "2", "--json"],
            "restore 2": ["restore", "2", "--json"], "export": ["export", export_to, "--json"]}


def imported(stderr: str) -> list[str]:
    """Top-level heavy packages in a `-X importtime` trace (lines end in `|   <module>`)."""
    names = {line.rsplit("|", 1)[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in names]


def run(path: str, argv: list[str], trace: bool = False) -> tuple[float, list[str]]:
    """(wall seconds, heavy modules imported: only when `trace`) of `sola --registry path argv`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, *(["-X", "importtime"] if trace else []), "-m", "sola_core", "--registry", path, *argv]
    timer = [sys.executable, "-c", "import subprocess, sys, time; t = time.perf_counter(); "
             "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stderr.write(p.stderr); print(time.perf_counter() - t); sys.exit(p.returncode)", *command]
    done = subprocess.run(timer, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.splitlines()[-1:]}")
    return float(done.stdout.split()[-1]), imported(done.stderr) if trace else []


def main() -> None:
    print(f"load average {os.getloadavg()}", flush=True)
    result = {"machine": machine(), "load_avg_start": os.getloadavg(), "edits": N, "runs": RUNS, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        with EditRegistry.create(f"{tmp}/reg", config()) as reg:
            reg.add_many(synthetic_edits(config(), N, seed=0))
        times: dict[str, list[float]] = {name: [] for name in commands("")}
        heavy = {name: run(f"{tmp}/reg", argv, trace=True)[1]
                 for name, argv in commands(f"{tmp}/bundle.safetensors").items()}
        for _ in range(RUNS):  # round by round, so `rollback 2` is always followed by `restore 2`
            for name, argv in commands(f"{tmp}/bundle.safetensors").items():
                seconds, _ = run(f"{tmp}/reg", argv)
                times[name].append(seconds)
        for name, seconds in times.items():
            result["rows"][name] = {"median_s": statistics.median(seconds), "min_s": min(seconds),
                                    "imports": heavy[name]}
            print(f"sola {name}: median {statistics.median(seconds):.3f} s (min {min(seconds):.3f}), "
                  f"imports {', '.join(heavy[name]) or 'none of ' + '/'.join(HEAVY)}")
    result["load_avg_end"] = os.getloadavg()
    print(f"load average {os.getloadavg()}")
    save(args.out, "admin_cli", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(result["rows"])
    ax.barh(names, [result["rows"][n]["median_s"] for n in names])
    ax.set_xlabel(f"median wall seconds, {N} edits")
    ax.invert_yaxis()
    fig.tight_layout()
    save_plot(fig, args.out, "admin_cli")


if __name__ == "__main__":
    main()
