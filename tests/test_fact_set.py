"""Structure of the checked-in counterfactual edit set bench/data/facts_300.jsonl (json + stdlib only, no model)."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "bench" / "data" / "facts_300.jsonl"

N_RECORDS = 300
MIN_RELATIONS = 20
MIN_PER_RELATION = 10
MAX_ANSWER_USES = 3
# Relations counted as geography; at most MAX_GEOGRAPHY of the relations in the file may be among them.
GEOGRAPHY = {"capital_of", "located_in", "located_in_country", "country_of", "continent_of", "city_of",
             "capital_city_of", "borders"}
MAX_GEOGRAPHY = 2
FIELDS = {"relation": str, "subject": str, "kind": str, "prompt": str, "answer": str, "true_answer": str,
          "paraphrases": list, "rephrases": list, "neighbours": list, "same_subject": list, "subject_questions": list}
LIST_LENGTHS = {"paraphrases": 2, "rephrases": 3, "neighbours": 2, "same_subject": 1, "subject_questions": 3}
END_PUNCT = ".?!,;:"


def _load() -> list[tuple[int, dict]]:
    raw = DATA.read_text(encoding="utf-8")
    assert raw.endswith("\n"), f"{DATA.name}: the last line should end with a newline"
    records = []
    for no, line in enumerate(raw.split("\n")[:-1], start=1):
        assert line.strip(), f"{DATA.name} line {no}: blank line"
        try:
            records.append((no, json.loads(line)))
        except json.JSONDecodeError as exc:  # pragma: no cover - message only
            pytest.fail(f"{DATA.name} line {no}: not valid JSON ({exc})")
    return records


RECORDS = _load()


def _where(no: int, rec: dict) -> str:
    return f"{DATA.name} line {no} ({rec.get('relation')!r}, subject {rec.get('subject')!r})"


def _edit_strings(rec: dict) -> list[str]:
    return [rec["prompt"], *rec["paraphrases"], *rec["rephrases"]]


def _is_completion(text: str) -> bool:
    return text == text.strip() and text[-1] not in END_PUNCT


def test_record_count():
    assert len(RECORDS) == N_RECORDS, f"{DATA.name}: {len(RECORDS)} records, expected {N_RECORDS}"


def test_fields_and_types():
    for no, rec in RECORDS:
        where = _where(no, rec)
        assert set(rec) == set(FIELDS), f"{where}: fields {sorted(rec)} != {sorted(FIELDS)}"
        for name, typ in FIELDS.items():
            assert isinstance(rec[name], typ), f"{where}: {name} should be {typ.__name__}"
        for name, n in LIST_LENGTHS.items():
            assert len(rec[name]) == n, f"{where}: {name} has {len(rec[name])} items, expected {n}"
            assert all(isinstance(s, str) for s in rec[name]), f"{where}: {name} items must be strings"
        for text in [rec["relation"], rec["subject"], rec["prompt"], rec["answer"], rec["true_answer"],
                     *rec["paraphrases"], *rec["rephrases"], *rec["neighbours"], *rec["same_subject"],
                     *rec["subject_questions"]]:
            assert text and text == text.strip(), f"{where}: empty or padded string {text!r}"
            assert "\n" not in text and "\r" not in text, f"{where}: newline inside {text!r}"
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", rec["relation"]), \
            f"{where}: relation {rec['relation']!r} is not snake_case"


def test_kind_and_prompt_shape():
    for no, rec in RECORDS:
        where = _where(no, rec)
        assert rec["kind"] in {"completion", "question"}, f"{where}: kind {rec['kind']!r}"
        if rec["kind"] == "question":
            assert rec["prompt"].endswith("?"), f"{where}: question prompt {rec['prompt']!r} must end with '?'"
        else:
            assert _is_completion(rec["prompt"]), \
                f"{where}: completion prompt {rec['prompt']!r} must not end with punctuation or space"
        assert rec["subject"].lower() in rec["prompt"].lower(), f"{where}: prompt does not contain the subject"
        for text in rec["paraphrases"]:
            assert rec["subject"].lower() in text.lower(), f"{where}: paraphrase {text!r} lacks the subject"


def test_kinds_are_mixed():
    kinds = Counter(rec["kind"] for _, rec in RECORDS)
    share = kinds["question"] / len(RECORDS)
    assert 0.2 <= share <= 0.45, f"{DATA.name}: {kinds['question']} question records of {len(RECORDS)}"
    by_rel: dict[str, set[str]] = {}
    for _, rec in RECORDS:
        by_rel.setdefault(rec["relation"], set()).add(rec["kind"])
    single = sorted(r for r, k in by_rel.items() if len(k) < 2)
    assert not single, f"{DATA.name}: relations without both kinds: {single}"


def test_relations():
    counts = Counter(rec["relation"] for _, rec in RECORDS)
    assert len(counts) >= MIN_RELATIONS, f"{DATA.name}: only {len(counts)} relations: {sorted(counts)}"
    small = {r: n for r, n in counts.items() if n < MIN_PER_RELATION}
    assert not small, f"{DATA.name}: relations with under {MIN_PER_RELATION} records: {small}"
    geo = sorted(set(counts) & GEOGRAPHY)
    assert len(geo) <= MAX_GEOGRAPHY, f"{DATA.name}: {len(geo)} geography relations: {geo}"


def test_subjects_and_prompts_distinct():
    seen_subjects: dict[str, int] = {}
    seen_prompts: dict[str, int] = {}
    for no, rec in RECORDS:
        where = _where(no, rec)
        subj, prompt = rec["subject"].lower(), rec["prompt"]
        assert subj not in seen_subjects, f"{where}: subject repeats line {seen_subjects[subj]}"
        assert prompt not in seen_prompts, f"{where}: prompt {prompt!r} repeats line {seen_prompts[prompt]}"
        seen_subjects[subj], seen_prompts[prompt] = no, no


def test_answers():
    for no, rec in RECORDS:
        where = _where(no, rec)
        answer = rec["answer"]
        assert answer.lower() != rec["true_answer"].lower(), f"{where}: answer equals true_answer"
        assert not answer.endswith("."), f"{where}: answer {answer!r} ends with a period"
        assert len(answer.split()) <= 4, f"{where}: answer {answer!r} is longer than 4 words"
        for text in _edit_strings(rec):
            assert answer.lower() not in text.lower(), f"{where}: answer {answer!r} appears in {text!r}"
    uses = Counter(rec["answer"].lower() for _, rec in RECORDS)
    over = {a: n for a, n in uses.items() if n > MAX_ANSWER_USES}
    assert not over, f"{DATA.name}: answers used more than {MAX_ANSWER_USES} times: {over}"


def test_paraphrase_and_rephrase_shape():
    for no, rec in RECORDS:
        where = _where(no, rec)
        para_c, para_q = rec["paraphrases"]
        assert _is_completion(para_c), f"{where}: paraphrases[0] {para_c!r} should be a completion"
        assert para_q.endswith("?"), f"{where}: paraphrases[1] {para_q!r} should be a question"
        reph = rec["rephrases"]
        assert _is_completion(reph[0]), f"{where}: rephrases[0] {reph[0]!r} should be a completion"
        assert reph[1].endswith("?"), f"{where}: rephrases[1] {reph[1]!r} must end with '?'"
        assert reph[2].endswith("?"), f"{where}: rephrases[2] {reph[2]!r} must end with '?'"
        strings = _edit_strings(rec)
        assert len(set(strings)) == len(strings), f"{where}: prompt/paraphrases/rephrases repeat a string"
        trained = {rec["prompt"], *rec["paraphrases"]}
        for text in reph:
            assert text not in trained, f"{where}: rephrase {text!r} is not held out"


def test_neighbours():
    edit_strings = {s: no for no, rec in RECORDS for s in _edit_strings(rec)}
    subjects = sorted({rec["subject"] for _, rec in RECORDS}, key=len, reverse=True)
    letter = r"[^\W\d_]"
    patterns = [(s, re.compile(rf"(?<!{letter}){re.escape(s)}(?!{letter})", re.IGNORECASE)) for s in subjects]
    seen: dict[str, int] = {}
    for no, rec in RECORDS:
        where = _where(no, rec)
        comp, quest = rec["neighbours"]
        assert _is_completion(comp), f"{where}: neighbours[0] {comp!r} should be a completion"
        assert quest.endswith("?"), f"{where}: neighbours[1] {quest!r} should be a question"
        for text in rec["neighbours"]:
            assert text not in edit_strings, f"{where}: neighbour {text!r} is an edit string of line {edit_strings[text]}"
            assert text not in seen, f"{where}: neighbour {text!r} repeats line {seen[text]}"
            seen[text] = no
            for subj, pat in patterns:
                assert not pat.search(text), f"{where}: neighbour {text!r} mentions edited subject {subj!r}"


def test_same_subject_probes_ask_another_attribute_of_the_subject():
    edit_strings = {s for _, rec in RECORDS for s in _edit_strings(rec)}
    for no, rec in RECORDS:
        where = _where(no, rec)
        (probe,) = rec["same_subject"]
        assert _is_completion(probe), f"{where}: same_subject {probe!r} should be a completion"
        assert rec["subject"].lower() in probe.lower(), f"{where}: same_subject {probe!r} lacks the subject"
        assert probe not in edit_strings, f"{where}: same_subject {probe!r} is an edit string"
        assert rec["answer"].lower() not in probe.lower(), f"{where}: same_subject {probe!r} holds the answer"


def test_subject_questions_ask_other_roles_and_attributes_of_the_subject():
    edit_strings = {s for _, rec in RECORDS for s in _edit_strings(rec)}
    whos = 0
    for no, rec in RECORDS:
        where = _where(no, rec)
        assert len(set(rec["subject_questions"])) == 3, f"{where}: subject_questions repeat"
        for probe in rec["subject_questions"]:
            assert probe.endswith("?"), f"{where}: subject question {probe!r} should be a question"
            assert rec["subject"].lower() in probe.lower(), f"{where}: subject question {probe!r} lacks the subject"
            assert probe not in edit_strings, f"{where}: subject question {probe!r} is an edit string"
            assert rec["answer"].lower() not in probe.lower(), f"{where}: subject question {probe!r} holds the answer"
            whos += probe.split()[0] in ("Who", "Which")
    assert whos >= len(RECORDS), f"{whos} who/which subject questions: the role questions are the point of the set"
