"""Routing outside a forward: `SolaEditor.route()` for 16 prompts and `key()` for one, per key source, and the
time one edit takes; with --before REF, side by side with the very same calls on git revision REF.

    python bench/route_call.py                     # this checkout (~3 min on 2 cores, SmolLM2)
    python bench/route_call.py --before HEAD~1     # also REF, checked out in a temporary git worktree
    python bench/route_call.py --quick             # seconds (a tiny random Llama)

Each checkout runs in its own process (its own `sola_core`), driven over a pipe through the public API only.
Every round asks each process in turn for one timed call, so load from other jobs hits them alike; ratios are
medians of per-round ratios. Each process first makes EDITS real edits (trained adapters), timed one by one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, parse_args, pyplot, ratio_summary, save, save_plot, summary

import numpy as np
from tqdm import tqdm

# -- config ------------------------------------------------------------------------------------------
KEY_SOURCES = ["encoder", "layer"]
PROMPTS = 16  # route() batch; the first EDITS of them are edited
EDITS = 6
ROUNDS = 40

args = parse_args(__doc__, before=(str, "", "git revision to compare against (a temporary worktree)"),
                  worker=(str, "", "internal: serve timed calls for the checkout at this path"),
                  key_source=(str, "encoder", "internal: the worker's key source"))
if args.quick:
    EDITS, ROUNDS = 2, 3


def worker(checkout: str, key_source: str) -> None:
    """Serve one timed call per request line ("route", "key", "quit") for the `sola_core` under `checkout`."""
    sys.path.insert(0, checkout)
    from common import load_model_or_tiny

    import sola_core
    from sola_core import EditConfig, SolaEditor, TrainConfig
    from sola_core.facts import counterfacts

    model, tok = load_model_or_tiny(args.quick)
    facts = counterfacts(PROMPTS, seed=0)
    prompts = [f.prompt for f in facts]
    train = TrainConfig(lr=0.1, max_steps=300, margin=0.5) if args.quick else TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        editor = SolaEditor.open(Path(tmp) / "registry", model, tok, config=EditConfig(key_source=key_source))
        edit_seconds = []
        for fact in facts[:EDITS]:
            start = time.perf_counter()
            editor.edit(fact.prompt, fact.target, train)
            edit_seconds.append(time.perf_counter() - start)
        calls = {"route": lambda: editor.route(prompts), "key": lambda: editor.key(prompts[0])}
        for fn in calls.values():
            fn()  # warm up
        print(json.dumps({"edit_seconds": edit_seconds, "routed": sum(r is not None for r in editor.route(prompts)),
                          "sola_core": sola_core.__file__}), flush=True)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            start = time.perf_counter()
            calls[line.strip()]()
            print(json.dumps(time.perf_counter() - start), flush=True)
        editor.close()


class Worker:
    def __init__(self, checkout: Path, key_source: str) -> None:
        command = [sys.executable, __file__, "--worker", str(checkout), "--key-source", key_source,
                   "--threads", str(args.threads), "--out", str(args.out)] + (["--quick"] if args.quick else [])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} exited with {self.proc.wait()}")
        return json.loads(line)

    def time(self, call: str) -> float:
        self.proc.stdin.write(call + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    info = machine()
    checkouts = {"after": ROOT}
    worktree = None
    if args.before:
        worktree = Path(tempfile.mkdtemp(prefix="sola-bench-before-"))
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.before], check=True,
                       capture_output=True)
        checkouts = {"before": worktree, **checkouts}
        info["before"] = subprocess.run(["git", "-C", str(worktree), "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    info["after"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip()
    try:
        workers = {(ks, name): Worker(path, ks) for ks in KEY_SOURCES for name, path in checkouts.items()}
        times = {(ks, name, call): [] for ks, name in workers for call in ("route", "key")}
        for _ in tqdm(range(ROUNDS), desc="rounds"):
            for (ks, name), w in workers.items():
                for call in ("route", "key"):
                    times[(ks, name, call)].append(w.time(call))
        for w in workers.values():
            w.close()
    finally:
        if worktree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    rows = []
    for ks in KEY_SOURCES:
        for call in ("route", "key"):
            row = {"key_source": ks, "call": call}
            for name in checkouts:
                row[name] = summary(times[(ks, name, call)])
            if "before" in checkouts:
                row["after_over_before"] = ratio_summary(times[(ks, "after", call)], times[(ks, "before", call)])
            rows.append(row)
        for name in checkouts:
            ready = workers[(ks, name)].ready
            rows.append({"key_source": ks, "call": "edit", name + "_edit_seconds_median":
                         float(np.median(ready["edit_seconds"])), name + "_routed": ready["routed"],
                         name + "_sola_core": ready["sola_core"]})
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    save(args.out, "route_call", {"machine": info, "prompts": PROMPTS, "edits": EDITS, "rounds": ROUNDS, "rows": rows})
    for row in rows:
        print(json.dumps(row))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{ks} {call}" for ks in KEY_SOURCES for call in ("route", "key")]
    for i, name in enumerate(checkouts):
        p50 = [times[(ks, name, call)] for ks in KEY_SOURCES for call in ("route", "key")]
        ax.bar(np.arange(len(labels)) + 0.4 * i, [np.median(t) * 1e3 for t in p50], width=0.4, label=name)
    ax.set_xticks(np.arange(len(labels)) + 0.2 * (len(checkouts) - 1), labels)
    ax.set_ylabel("median ms per call")
    ax.set_title(f"route() of {PROMPTS} prompts and key() of one")
    ax.legend()
    save_plot(fig, args.out, "route_call")


if args.worker:
    worker(args.worker, args.key_source)
elif __name__ == "__main__":
    main()
