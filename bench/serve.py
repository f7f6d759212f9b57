"""`sola serve` under load: requests/s and latency p50/p99 at 1, 4 and 16 concurrent clients, edited vs unedited.

    python bench/serve.py            # SmolLM2, a registry of edits keyed on half the prompts: ~6 min alone
    python bench/serve.py --quick    # a tiny random Llama: seconds

Two servers run one after the other on the same registry: the default (every request waiting when the model frees
up joins one batch, `--max-batch 16`) and `--max-batch 1` (one request at a time, what a lock around the model
gives). At each concurrency the clients send unedited and edited prompts in alternating rounds (the edited ones
route to an edit: every row pays the adapter), greedy, `ignore_eos` so that every reply has the same length.
Latency is per request, client side, over loopback HTTP; requests/s is requests over the round's wall time. With
a few dozen requests per point, p99 is close to the slowest request.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, load_model_or_tiny, machine, parse_args, prompts_of_length, pyplot, real_edits, save, \
    save_plot, summary

import httpx  # noqa: E402

from sola_core import EditConfig, SolaEditor  # noqa: E402
from sola_core.launch import Launched, free_port  # noqa: E402

CLIENTS = [1, 4, 16]
REQUESTS = {1: 6, 4: 12, 16: 32}  # per round at each concurrency, split over the clients
ROUNDS = 1  # unedited and edited alternate, round after round
PROMPT_TOKENS, MAX_TOKENS = 24, 16
BATCHES = [16, 1]  # --max-batch of the two servers

args = parse_args(__doc__)
if args.quick:
    CLIENTS, REQUESTS, ROUNDS, PROMPT_TOKENS, MAX_TOKENS = [1, 4], {1: 4, 4: 8}, 1, 16, 4

info = machine()
work = tempfile.TemporaryDirectory(prefix="sola-bench-serve-")
model, tok = load_model_or_tiny(args.quick)
if args.quick:  # the server loads a model directory
    model_arg = str(Path(work.name) / "model")
    model.save_pretrained(model_arg)
    tok.save_pretrained(model_arg)
else:
    model_arg = "smollm2"
most = max(REQUESTS.values())
prompts = prompts_of_length(tok, 2 * most, PROMPT_TOKENS)
unedited, edited = prompts[:most], prompts[most:]
registry = str(Path(work.name) / "registry")
# Edits keyed on the edited prompts' own keys, with random adapters: only the cost is measured here (quality is
# bench/quality.py's). A tight threshold: these word-salad prompts sit close together in the encoder's space.
with SolaEditor.open(registry, model, tok, config=EditConfig(threshold=0.01)) as editor:
    editor.registry.add_many(real_edits(editor, edited))
del model


def start(max_batch: int) -> Launched:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    argv = [sys.executable, "-m", "sola_core", "--registry", registry, "--model", model_arg, "serve", "--port",
            str(port), "--served-model-name", "m", "--max-batch", str(max_batch)]
    try:
        return Launched(argv, port, Path(work.name) / f"serve-{max_batch}.log", env=env)
    except RuntimeError as e:
        raise SystemExit(f"sola serve did not start: {e}")


def round_of(url: str, texts: list[str], clients: int, expect_edit: bool) -> dict:
    """All `texts` sent by `clients` threads (one keep-alive connection each); per-request latencies."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for text in share:
                t0 = time.perf_counter()
                r = http.post("/v1/completions", json={"model": "m", "prompt": text, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0, "ignore_eos": True})
                elapsed = time.perf_counter() - t0
                r.raise_for_status()
                choice = r.json()["choices"][0]
                assert (choice["sola_edit"] is not None) == expect_edit, (text, choice)
                with lock:
                    latencies.append(elapsed)

    before = httpx.get(url + "/health").json()
    start_t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [texts[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - start_t
    after = httpx.get(url + "/health").json()
    batches = after["batches"] - before["batches"]
    return {"latencies": latencies, "wall_s": wall, "rows_per_batch": (after["rows"] - before["rows"]) / batches}


results = []
for max_batch in BATCHES:
    server = start(max_batch)
    url = server.url
    try:
        round_of(url, unedited[:2], 1, False)  # warm-up: first-call costs out of the numbers
        for clients in CLIENTS:
            runs = {"unedited": [], "edited": []}
            for _ in range(ROUNDS):
                for kind, texts in (("unedited", unedited), ("edited", edited)):
                    runs[kind].append(round_of(url, texts[:REQUESTS[clients]], clients, kind == "edited"))
            for kind, rounds in runs.items():
                lat = [x for r in rounds for x in r["latencies"]]
                wall = sum(r["wall_s"] for r in rounds)
                row = {"max_batch": max_batch, "clients": clients, "prompts": kind, "requests": len(lat),
                       "requests_per_s": len(lat) / wall, "tokens_per_s": len(lat) * MAX_TOKENS / wall,
                       "rows_per_batch": sum(r["rows_per_batch"] for r in rounds) / len(rounds), **summary(lat)}
                results.append(row)
                print(f"max-batch {max_batch:2d}  {clients:2d} clients  {kind:8s}  {row['requests_per_s']:6.2f} req/s  "
                      f"p50 {row['p50_ms']:7.0f} ms  p99 {row['p99_ms']:7.0f} ms  "
                      f"{row['rows_per_batch']:.1f} rows/batch  (load {os.getloadavg()[0]:.2f})", flush=True)
    finally:
        server.stop()


def rate(max_batch: int, clients: int, kind: str) -> float:
    return next(r["requests_per_s"] for r in results
                if (r["max_batch"], r["clients"], r["prompts"]) == (max_batch, clients, kind))


top = max(CLIENTS)
ratios = {"batched_vs_one_at_a_time_at_%d_clients" % top: rate(16, top, "unedited") / rate(1, top, "unedited"),
          "edited_vs_unedited_at_%d_clients" % top: rate(16, top, "edited") / rate(16, top, "unedited"),
          "edited_vs_unedited_at_1_client": rate(16, 1, "edited") / rate(16, 1, "unedited")}
for name, value in ratios.items():
    print(f"{name}: {value:.2f}")
info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
save(args.out, "serve", {"machine": info, "settings": {"prompt_tokens": PROMPT_TOKENS, "max_tokens": MAX_TOKENS,
                                                       "requests_per_round": {str(k): v for k, v in REQUESTS.items()}, "rounds": ROUNDS,
                                                       "edits": len(edited), "model": model_arg},
                         "results": results, "ratios": ratios})
plt = pyplot()
fig, ax = plt.subplots(figsize=(6, 4))
for max_batch in BATCHES:
    for kind, style in (("unedited", "-"), ("edited", "--")):
        ax.plot(CLIENTS, [rate(max_batch, c, kind) for c in CLIENTS], style, marker="o",
                label=f"max-batch {max_batch}, {kind}")
ax.set_xlabel("concurrent clients")
ax.set_ylabel("requests / s")
ax.set_xscale("log", base=2)
ax.set_title(f"sola serve, {MAX_TOKENS} new tokens per request")
ax.legend()
save_plot(fig, args.out, "serve")
