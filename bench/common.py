"""Shared by the bench scripts: timing, machine facts, synthetic edits, results files.

Each script in bench/ is one command (config at the top, one loop, nanoGPT train.py style); this module
holds only what several of them need. Timings on a shared machine are noisy, so every comparison here is
made side by side, interleaved, and summarized by medians and percentiles rather than means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` without installing the package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from registry.types import adapter_names  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def parse_args(doc: str, **extra: tuple[type, object, str]) -> argparse.Namespace:
    """--quick (a seconds-long smoke run), --out (results folder), --threads, plus a script's own flags."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run that finishes in seconds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG results")
    parser.add_argument("--threads", type=int, default=0, help="torch and faiss threads (0: their defaults)")
    for name, (kind, default, help_text) in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=help_text)
    args = parser.parse_args()
    if args.threads:  # fewer threads than busy cores avoids OpenMP barrier stalls on a shared machine
        import faiss

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


# --- timing ---------------------------------------------------------------------------------------
def clock(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (CUDA work is waited for, so GPU timings are real)."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summary(seconds: list[float]) -> dict:
    """p50/p99/min/mean in milliseconds; with few samples p99 is simply the slowest."""
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "min_ms": float(ms.min()), "mean_ms": float(ms.mean()), "samples": int(len(ms))}


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                progress: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time several functions in turn, ``reps`` rounds, so that load from other jobs hits them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(clock(fn))
        if progress:
            progress()
    return times


def ratio_summary(num: list[float], den: list[float]) -> dict:
    """Median of per-round ratios (robust to load that changes between rounds) and its spread."""
    ratios = np.asarray(num) / np.asarray(den)
    return {"ratio_median": float(np.median(ratios)), "ratio_p25": float(np.percentile(ratios, 25)),
            "ratio_p75": float(np.percentile(ratios, 75)), "ratio_of_medians": float(np.median(num) / np.median(den))}


# --- machine ----------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What a reader needs to compare numbers: CPU, cores, memory, GPU, library versions, load, date."""
    import faiss
    import transformers

    info = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu_model(),
            "nproc": os.cpu_count(), "ram_gb": round(total_ram() / 2**30, 1), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "faiss": faiss.__version__, "faiss_gpu": hasattr(faiss, "StandardGpuResources"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    return info


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def rss_bytes(kind: str = "VmRSS") -> int:
    """Resident memory from /proc/self/status (Linux; 0 elsewhere).

    ``VmRSS`` counts the registry's memory-mapped LMDB pages once touched (page cache, reclaimable);
    ``RssAnon`` is the process's own memory (tensors, arrays), the part that competes for RAM.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Highest RSS (``peak``) and anonymous RSS (``peak_anon``) seen while the ``with`` block runs.

    Sampled every few ms on a thread: ``ru_maxrss`` only ever grows over the whole process, so it cannot
    give the peak of one phase.
    """

    def __init__(self, every_s: float = 0.005):
        self.every_s, self.peak, self.peak_anon = every_s, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        self.peak = max(self.peak, rss_bytes())
        self.peak_anon = max(self.peak_anon, rss_bytes("RssAnon"))

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def memory_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Best measured read bandwidth (bytes/s) over a buffer far larger than the caches.

    The same kind of pass a brute-force key scan makes: a reduction over every byte, on all threads
    (torch) and on one (numpy); the faster is the bound.
    """
    buf = torch.ones(nbytes // 4)
    best = 0.0
    for reduce in (lambda: buf.sum(), lambda: buf.numpy().sum()):
        reduce()
        best = max(best, nbytes / min(clock(reduce) for _ in range(reps)))
    del buf
    return best


# --- synthetic edits -------------------------------------------------------------------------------
def synthetic_edits(config, n: int, seed: int = 0, scale: float = 0.01, chunk: int = 1000) -> Iterator[dict]:
    """``n`` items for ``EditRegistry.add_many``: random unit-ish keys and small random adapters.

    Drawn a chunk at a time from one generator: per-edit draws would cost more than the registry's writes.
    Random keys in hundreds of dimensions are far apart (cosine distance ~1), so none routes real inputs.
    """
    rng = np.random.default_rng(seed)
    shapes = [(config.rank, layer.in_features, layer.out_features) for layer in config.layers]
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        keys = rng.standard_normal((m, config.key_dim), dtype=np.float32)
        tensors = [(rng.standard_normal((m, r, i), dtype=np.float32) * scale,
                    rng.standard_normal((m, o, r), dtype=np.float32) * scale) for r, i, o in shapes]
        for j in range(m):
            adapter = {}
            for layer, (A, B) in enumerate(tensors):
                a, b = adapter_names(layer)
                adapter[a], adapter[b] = torch.from_numpy(A[j]), torch.from_numpy(B[j])
            yield {"prompt": f"synthetic edit {start + j}", "target": " x", "keys": keys[j], "adapter": adapter}


def random_adapter(config, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    return next(synthetic_edits(config, 1, seed=seed, scale=scale))["adapter"]


def real_edits(editor, prompts: list[str]) -> list[dict]:
    """Items for ``add_many`` keyed on these prompts' own routing keys (random adapters: only the timing matters)."""
    cfg = editor.registry.config
    return [{"prompt": p, "target": " x", "keys": editor.key(p).cpu().numpy(), "adapter": random_adapter(cfg, seed=i)}
            for i, p in enumerate(prompts)]


# --- models and prompts ------------------------------------------------------------------------------
WORDS = ("river mountain quiet city garden bright ancient silver market winter bridge forest harbor letter "
         "candle museum desert island engine violin planet castle meadow lantern").split()


def load_model_or_tiny(tiny: bool):
    """(model, tokenizer): SmolLM2-135M-Instruct, or (for --quick runs) the tests' tiny random Llama."""
    if not tiny:
        from sola_core import load_model

        return load_model()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model, make_tokenizer

    tok = make_tokenizer()
    return make_model("llama", len(tok)), tok


def prompts_of_length(tok, count: int, length: int, seed: int = 0) -> list[str]:
    """Distinct prompts of exactly ``length`` tokens, so that a batch of them has no padding."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        text = f"Note {len(out)} says"
        while len(tok(text)["input_ids"]) < length:
            text += " " + rng.choice(WORDS)
        if len(tok(text)["input_ids"]) == length:
            out.append(text)
    return out


# --- output -----------------------------------------------------------------------------------------
def save(out: Path, name: str, data: dict) -> Path:
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    print(f"wrote {path}")
    return path


def save_plot(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def disk_usage(path: str | os.PathLike) -> int:
    """Bytes actually allocated under ``path`` (sparse files count what they hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total
