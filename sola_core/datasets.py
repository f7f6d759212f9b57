"""Edit cases from real third-party data (QAEdit, COUNTERFACT) and from our own fact sets, in one shape.

The files are read where they lie (the project's `../shared/data/`, or any path): they are other researchers'
records and are never copied into this repository. The format is recognised from the fields of the first record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from registry.errors import ValidationError

KINDS = ("question", "completion")


@dataclass
class Case:
    """One edit and the prompts it is judged on."""

    prompt: str  # the edit's own prompt: a question, or a sentence to complete
    answer: str  # the new answer (no leading space; trained as " " + answer after a completion prompt)
    kind: str  # "question" or "completion"
    rephrases: list[str] = field(default_factory=list)  # the same fact asked otherwise (held out): must give the answer
    neighbours: list[str] = field(default_factory=list)  # same relation, other subjects: reply must not change
    unrelated: list[str] = field(default_factory=list)  # other facts: reply must not change
    source: str = ""
    paraphrases: list[str] = field(default_factory=list)  # phrasings a user may give with the edit (never judged)
    same_subject: list[str] = field(default_factory=list)  # another attribute of the subject: reply must not change
    subject: str | None = None  # what the fact is about, as the prompt words it (given with the edit on request)
    subject_questions: list[str] = field(default_factory=list)  # questions of other roles about the subject: unchanged


def tidy(answer: str) -> str:
    """A published answer without the artefacts some records carry ("Wilt Chamberlain *", "THALLIUM.")."""
    return answer.strip().rstrip("*.").strip()


def load_cases(path: str | Path, limit: int | None = None) -> list[Case]:
    """Cases from a JSONL file: QAEdit records, COUNTERFACT (KnowEdit) records, or our own
    {"prompt", "answer", "kind", "paraphrases", "rephrases", "neighbours", "unrelated", "same_subject",
    "subject_questions"} lines
    (bench/data/facts_300.jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError(f"no dataset file at {path}")
    cases = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError(f"{path} line {n}: not valid UTF-8 text") from None
            if not line.strip():
                continue
            try:
                cases.append(case_of(json.loads(line), path.stem))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError) as e:
                raise ValidationError(f"{path} line {n}: not a QAEdit, COUNTERFACT or case record ({e!r})") from None
            if limit is not None and len(cases) >= limit:
                break
    return cases


def case_of(record: dict, source: str) -> Case:
    if "target_new" in record:  # COUNTERFACT: a completion prompt; its locality prompt is a same-relation neighbour
        return Case(record["prompt"], tidy(record["target_new"]), "completion", [record["rephrase_prompt"]],
                    [record["locality_prompt"]], [], source, subject=record.get("subject"))
    if "locality" in record:  # QAEdit: a question; its locality questions are unrelated facts
        return Case(record["prompt"], tidy(record["target"]), "question", [record["rephrase"]], [],
                    [item["loc"] for item in record["locality"]], source, subject=record.get("subject"))
    kind = record.get("kind", "completion")
    if kind not in KINDS:
        raise KeyError(f"kind must be one of {KINDS}")
    return Case(record["prompt"], tidy(record["answer"]), kind, list(record.get("rephrases", [])),
                list(record.get("neighbours", [])), list(record.get("unrelated", [])), source,
                list(record.get("paraphrases", [])), list(record.get("same_subject", [])), record.get("subject"),
                list(record.get("subject_questions", [])))
