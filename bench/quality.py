"""Edit quality side by side: SoLA (encoder key, layer key) vs sequential LoRA vs GRACE on the same facts.

    python bench/quality.py --edits 1000            # writes bench/results/quality.json and quality.md

Methods run one after another and each is saved as it finishes; rerunning with `--methods` for the same
`--edits` and `--seed` adds to (or replaces columns of) the saved table. Two runs may write the same table at
once (say `--threads 1` each, one per core): each merges into what is saved when it saves.

Every method edits the same layer of the same model (SmolLM2-135M-Instruct by default) with the same facts in
the same order, and is measured by the same harness (sola_core/evaluate.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.baselines.grace import Grace  # noqa: E402
from bench.baselines.lora_seq import SequentialLoRA  # noqa: E402
from sola_core.config import EditConfig  # noqa: E402
from sola_core.evaluate import evaluate, evaluate_sola  # noqa: E402
from sola_core.facts import counterfacts  # noqa: E402
from sola_core.models import default_layers, load_model  # noqa: E402

METHODS = ["sola-encoder", "sola-layer", "lora-seq", "grace"]
OUT = Path(__file__).resolve().parent / "results"


def run(method: str, n: int, seed: int, model_name: str | None) -> dict:
    model, tokenizer = load_model(model_name)
    facts = counterfacts(n, seed=seed)
    layer = default_layers(model)[0]
    bar = tqdm(total=n, desc=method, file=sys.stderr)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if method.startswith("sola"):
        with tempfile.TemporaryDirectory() as tmp:
            config = EditConfig(key_source=method.split("-")[1], layers=[layer])
            report = evaluate_sola(model, tokenizer, facts, f"{tmp}/r", config=config, seed=seed, progress=bar.update)
    else:
        peer = SequentialLoRA(model, tokenizer, layer) if method == "lora-seq" else Grace(model, tokenizer, layer)
        report = evaluate(peer, facts, target_tokens=count, seed=seed, rollback=peer.rollback, progress=bar.update,
                          stats=lambda: {"trainable_params_per_edit": peer.trainable})
    bar.close()
    return report.metrics


def table(results: dict[str, dict]) -> str:
    keys = [k for k in next(iter(results.values())) if not isinstance(next(iter(results.values()))[k], (list, str))]
    rows = [f"| metric | {' | '.join(results)} |", "|---" * (len(results) + 1) + "|"]
    for k in keys:
        cells = [results[m].get(k, "n/a") for m in results]
        rows.append(f"| {k} | " + " | ".join(f"{c:.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=str(OUT / "quality"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods.split(","):  # saved after each method: a long run keeps what it finished
        metrics = {**run(method, args.edits, args.seed, args.model), "torch_threads": torch.get_num_threads()}
        results = {**saved_results(out, args.edits, args.seed), method: metrics}
        out.write_text(json.dumps({"edits": args.edits, "seed": args.seed, "results": results}, indent=2))
        Path(args.out + ".md").write_text(table(results) + "\n")
    print(table(results))


def saved_results(out: Path, edits: int, seed: int) -> dict[str, dict]:
    """The table saved so far for this many edits and this seed (another one is replaced)."""
    saved = json.loads(out.read_text()) if out.exists() else {}
    return saved.get("results", {}) if saved.get("edits") == edits and saved.get("seed") == seed else {}


if __name__ == "__main__":
    main()
