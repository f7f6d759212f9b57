"""Loading stored edits (issue 13, item 5): the registry's add path and `sola import` of a 10k-edit bundle in
edits/s, beside PEFT's `add_adapter` for the same adapters on SmolLM2.

    python bench/bulk_import.py           # 10k SmolLM2-shaped edits; PEFT with 1000 adapters (~3 min)
    python bench/bulk_import.py --quick   # seconds

The edits are random keys and adapters of SmolLM2's default shape (encoder key of 384 floats, a rank-4 adapter
on layer 24's 1536->576 down_proj): only the writes are timed, no training. `sola import` runs as a real
subprocess (its start-up included); the API rows time `EditRegistry` calls in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

from common import ROOT, clock, load_model_or_tiny, machine, parse_args, pyplot, save, save_plot, synthetic_edits

import torch

from registry import EditRegistry, LayerSpec, RegistryConfig

# -- config ------------------------------------------------------------------------------------------
N = 10_000  # edits in the bundle and in each bulk add
ONE_BY_ONE = 500  # edits added with one `add` (one transaction) each
PEFT_ADAPTERS = 1000
LAYER = "model.layers.24.mlp.down_proj"

args = parse_args(__doc__)
if args.quick:
    N, ONE_BY_ONE, PEFT_ADAPTERS = 300, 30, 20


def config() -> RegistryConfig:
    return RegistryConfig(key_dim=384, layers=[LayerSpec(LAYER, 1536, 576)], rank=4, alpha=4.0, metric="cosine",
                          threshold=0.15, key_source="encoder", fingerprint={"model": "synthetic"})


def peft_add_adapter(adapters: list[dict]) -> list[float]:
    """Seconds of each `add_adapter` (plus setting its weights) on one PeftModel, in order."""
    from peft import LoraConfig, get_peft_model

    model, _ = load_model_or_tiny(args.quick)
    layer = LAYER if not args.quick else "model.layers.2.mlp.down_proj"
    lora = LoraConfig(r=4, lora_alpha=4.0, target_modules=[layer], lora_dropout=0.0, bias="none")
    peft_model, seconds = None, []
    for i, adapter in enumerate(adapters):
        start = time.perf_counter()
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name="e0")
        else:
            peft_model.add_adapter(f"e{i}", lora)
        module = peft_model.base_model.model.get_submodule(layer)
        if not args.quick:
            with torch.no_grad():
                module.lora_A[f"e{i}"].weight.copy_(adapter["0.A"])
                module.lora_B[f"e{i}"].weight.copy_(adapter["0.B"])
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    result = {"machine": machine(), "load_avg_start": os.getloadavg(), "edits": N}
    print(f"load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        items = list(synthetic_edits(config(), N, seed=0))
        rows = {}
        with EditRegistry.create(f"{tmp}/many", config()) as reg:
            rows["add_many, 1000 per transaction"] = (N, clock(lambda: reg.add_many(items)))
            bundle = f"{tmp}/edits.safetensors"
            reg.export(bundle)
        with EditRegistry.create(f"{tmp}/unchecked", config()) as reg:
            rows["add_many, conflict search off"] = (N, clock(lambda: reg.add_many(items, check_conflicts=False)))
        with EditRegistry.create(f"{tmp}/one", config()) as reg:
            rows["add, one transaction each"] = (ONE_BY_ONE, clock(
                lambda: [reg.add(**item) for item in islice(items, ONE_BY_ONE)]))
        with EditRegistry.create(f"{tmp}/api", config()) as reg:
            rows["EditRegistry.import_ (one transaction)"] = (N, clock(lambda: reg.import_(bundle)))
        EditRegistry.create(f"{tmp}/cli", config()).close()
        command = [sys.executable, "-m", "sola_core", "--registry", f"{tmp}/cli", "import", bundle, "--json"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        rows["sola import (a subprocess, start-up included)"] = (N, clock(
            lambda: subprocess.run(command, check=True, capture_output=True, env=env)))
        peft = peft_add_adapter([item["adapter"] for item in items[:PEFT_ADAPTERS]])
        rows[f"PEFT add_adapter, {PEFT_ADAPTERS} adapters"] = (PEFT_ADAPTERS, sum(peft))
    tenth = max(1, PEFT_ADAPTERS // 10)
    result["rows"] = {name: {"edits": n, "seconds": s, "edits_per_s": n / s} for name, (n, s) in rows.items()}
    result["peft_first_tenth_ms"] = 1000 * sum(peft[:tenth]) / tenth
    result["peft_last_tenth_ms"] = 1000 * sum(peft[-tenth:]) / tenth
    result["load_avg_end"] = os.getloadavg()
    for name, row in result["rows"].items():
        print(f"{name}: {row['edits']} edits in {row['seconds']:.2f} s = {row['edits_per_s']:.0f} edits/s")
    print(f"PEFT add_adapter: {result['peft_first_tenth_ms']:.1f} ms each for the first tenth, "
          f"{result['peft_last_tenth_ms']:.1f} ms for the last; load average {os.getloadavg()}")
    save(args.out, "bulk_import", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(result["rows"])
    ax.barh(names, [result["rows"][n]["edits_per_s"] for n in names])
    ax.set_xscale("log")
    ax.set_xlabel("edits / s (log)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_plot(fig, args.out, "bulk_import")


if __name__ == "__main__":
    main()
