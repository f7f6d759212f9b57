"""Judging edits the way users use the model: styles, reply cutting, answer matching, loops, real datasets."""
import copy
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.errors import ValidationError
from sola_core import EditConfig, TrainConfig
from sola_core.datasets import Case, load_cases, tidy
from sola_core.generation import greedy, tokenize_batch
from sola_core.wild import cut, evaluate_sola_in_use, holds, loops, normalise, settled, styled
from tests.sola_core.test_chat import CHATML

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def test_replies_are_cut_at_the_first_stop_and_matched_after_normalising():
    assert cut("\n  Wilt Chamberlain. He scored 100.") == "Wilt Chamberlain"
    assert cut(" Paris\nThe capital") == "Paris"
    assert cut(" President Gerald R. Ford. He") == "President Gerald R. Ford"  # an initial ends no sentence
    assert cut(" 24,303.04 square kilometres.") == "24,303.04 square kilometres"
    assert cut("Scunthorpe & Lindsey United F.C. in 1899") == "Scunthorpe & Lindsey United F.C. in 1899"
    assert normalise("The THALLIUM, of course!") == "thallium of course"
    assert holds(" It was the Wilt Chamberlain.", "Wilt Chamberlain") and not holds(" Wilt", "Wilt Chamberlain")
    assert holds(" Quito is it", "Quito", starts=True) and not holds(" It is Quito", "Quito", starts=True)
    assert tidy("Wilt Chamberlain *") == "Wilt Chamberlain" and tidy("THALLIUM.") == "THALLIUM"


@given(st.text(alphabet=" \n.,4RFa", max_size=24), st.data())
def test_a_settled_reply_is_cut_where_the_whole_reply_is(reply, data):
    part = reply[:data.draw(st.integers(0, len(reply)))]
    if settled(part):
        assert cut(part) == cut(reply)


def test_settled_waits_for_what_follows_a_full_stop():
    assert settled(" Paris.\n") and settled(" Paris. The") and settled("\n\nParis\n")
    assert not settled(" 24,303.") and not settled(" Gerald R. ") and not settled("\n\n") and not settled(" Paris")


def test_greedy_until_ends_each_row_on_its_own(llama, tokenizer):
    prompts = ["The capital of France is", "Hello, how are you today?", "Water boils at"]
    enc = tokenize_batch(llama, tokenizer, prompts, "cpu")
    whole = greedy(llama, tokenizer, enc, 12)
    early = greedy(llama, tokenizer, enc, 12, until=lambda text: len(text) >= 6)
    for short, full in zip(early, whole):
        assert full.startswith(short) and (len(short) >= 6 or short == full)
    assert sum(len(s) for s in early) < sum(len(f) for f in whole)


def test_loops_are_phrases_three_times_in_a_row():
    assert loops("University of Michigan University of Michigan University of Michigan")
    assert loops("winger winger winger") and loops("Quito, Quito, Quito,")
    assert not loops("Lyon. Lyon is the largest city in France, and Lyon is old")


def test_styles(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    assert styled("Who?", "question", "bare", tok) == "Who?"
    assert styled("Who?", "question", "instruct", tok) == "Please answer the question:\n\nQ: Who?\nA:"
    assert styled("Who?", "question", "chat", tok).endswith("<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValidationError, match="^style must be one of bare, instruct, chat, got 'poem'$"):
        styled("Who?", "question", "poem", tok)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_the_third_party_datasets_load_where_they_lie():
    qa = load_cases(SHARED / "qaedit_300.jsonl")
    cf = load_cases(SHARED / "counterfact_300.jsonl", limit=10)
    assert len(qa) == 300 and len(cf) == 10
    assert qa[0].kind == "question" and qa[0].answer == "Wilt Chamberlain" and len(qa[0].unrelated) == 5
    assert cf[0].kind == "completion" and cf[0].answer == "English" and cf[0].neighbours and cf[0].rephrases


def test_our_fact_set_loads_with_every_probe():
    cases = load_cases(Path(__file__).resolve().parents[2] / "bench" / "data" / "facts_300.jsonl")
    assert len(cases) == 300 and len(cases[0].paraphrases) == 2 and len(cases[0].neighbours) == 2
    assert cases[0].same_subject == ["The official language of Japan is"]
    assert cases[0].subject_questions[0] == "Who leads the government of Japan?"


def test_a_file_of_another_shape_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "Who?"}) + "\n")
    with pytest.raises(ValidationError, match="line 1: not a QAEdit, COUNTERFACT or case record"):
        load_cases(path)


def test_the_harness_judges_every_style(tmp_path, llama, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    cases = [Case("The capital of France is", "Tokyo", "completion", ["The capital of France is"],
                  ["The capital of Italy is"], ["Water boils at"]),
             Case("The largest planet is", "Rome", "completion", [], [], ["Hello, how are you today?"],
                  same_subject=["The largest planet has a moon called"],
                  subject_questions=["Which moon of the largest planet is the biggest?"])]
    train = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
    report = evaluate_sola_in_use(llama, tok, cases, str(tmp_path / "r"), config=EditConfig(key_source="encoder"),
                                  train=train, max_new_tokens=8)
    m = report.metrics
    assert m["bare/reliability"] == 1.0 and m["bare/generalization"] == 1.0  # the prompt itself, as edited
    assert m["bare/routed"] == m["chat/routed"] == m["bare/rephrases_routed"] == 1.0  # chat: the user message
    for style in ("bare", "instruct", "chat"):
        assert m[f"{style}/locality"] == 1.0 and m[f"{style}/rollback_fidelity"] == 1.0
        assert 0.0 <= m[f"{style}/reliability"] <= 1.0 and f"{style}/loops" in m and f"{style}/false_routes" in m
        assert 0.0 <= m[f"{style}/subject_locality"] <= 1.0 and 0.0 <= m[f"{style}/subject_false_routes"] <= 1.0
        assert 0.0 <= m[f"{style}/subject_question_locality"] <= 1.0
        assert 0.0 <= m[f"{style}/subject_question_false_routes"] <= 1.0
    assert m["edits"] == 2 and m["edits_stopped_short"] in (0, 1, 2)
    assert m["edit_steps_median"] >= 1 and all(e["steps"] >= 1 and "stopped_short" in e for e in report.edits)
