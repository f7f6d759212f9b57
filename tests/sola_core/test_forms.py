"""Edits in every form a user has: completions, questions, chat exchanges, each with optional paraphrases that
route to the edit and train it (API and CLI)."""
import json

import pytest
from click.testing import CliRunner

from registry import EditRegistry
from registry.errors import ValidationError
from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.cli import cli
from tests.sola_core.test_chat import CHATML, chat, with_template

TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
PROMPT = "The capital of France is"
FAR = "Which city hosts the French government?"  # the same fact, worded far from the prompt


def test_a_paraphrase_routes_to_its_edit_and_trains_it(tmp_path, llama, tokenizer):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        base = editor.generate([FAR], max_new_tokens=3)
        alone = editor.edit(PROMPT, " Lyon", TRAIN)
        assert editor.route([PROMPT, FAR]) == [alone, None]  # without the paraphrase its wording is not reached
        eid = editor.edit(PROMPT, " Lyon", TRAIN, paraphrases=[FAR, PROMPT])  # a repeat of the prompt adds nothing
        record = editor.registry.get(eid)
        assert record.supersedes == alone and record.paraphrases == [FAR]
        assert editor.registry.keys(eid).shape == (2, editor.registry.config.key_dim)
        assert record.info["examples"] == 4  # one per phrasing (no chat template here), the prompt asked, the question as QA
        assert editor.route([PROMPT, FAR]) == [eid, eid]
        assert editor.generate([FAR], max_new_tokens=3)[0].startswith(" Lyon")
        editor.rollback(eid)  # its predecessor comes back, without the paraphrase
        assert editor.route([PROMPT, FAR]) == [alone, None]
        assert editor.generate([FAR], max_new_tokens=3) == base


def test_a_completion_also_trains_asked_as_a_question(tmp_path, llama, tokenizer):
    """After a bare question SmolLM2 ends its reply at once: the adapter also learns the answer after one."""
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        def texts(train, text=PROMPT, form="completion"):
            return [tokenizer.decode(ids[0]) for ids, _ in editor._examples(text, " Lyon", form, train)]

        assert texts(TRAIN) == [PROMPT + " Lyon<eos>", PROMPT + " what? Lyon<eos>"]
        assert texts(TrainConfig(question_form=False)) == [PROMPT + " Lyon<eos>"]
        question = "Which city is the capital of France?"  # already a question: its QA form instead
        assert texts(TRAIN, question, "question") == [question + " Lyon<eos>", f"Question: {question}\nAnswer: Lyon<eos>"]


def test_a_question_edit_answers_after_a_space(tmp_path, llama, tokenizer):
    question = "What is the capital of France?"
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(question, "Lyon", TRAIN, form="question")
        assert editor.registry.get(eid).info["form"] == "question"
        assert editor.generate([question], max_new_tokens=3)[0].startswith(" Lyon")


def test_a_chat_edit_is_keyed_and_trained_as_the_template_serves_it(tmp_path, llama, tokenizer):
    """With the layer key, what routes is the templated conversation: the key is made from it, not the bare message."""
    tok = with_template(tokenizer, CHATML)
    message = "Tell me the capital of France."
    with SolaEditor.open(tmp_path / "r", llama, tok, config=EditConfig(key_source="layer", threshold=1e-4)) as editor:
        eid = editor.edit(message, "Lyon", TRAIN, form="chat")
        assert editor.route([chat(tok, message), message]) == [eid, None]
        assert editor.generate([chat(tok, message)], max_new_tokens=3)[0].startswith("Lyon")
        assert editor.registry.get(eid).info["examples"] == 2  # the chat exchange, then the bare form


@pytest.mark.parametrize("kwargs, message", [
    ({"form": "essay"}, "^form must be one of completion, question, chat, got 'essay'$"),
    ({"form": "chat"}, "^a chat edit needs a tokenizer with a chat template; this one has none$"),
    ({"paraphrases": ["  "]}, "^paraphrase must be a non-empty string, not only whitespace$"),
    ({"paraphrases": [f"p{i}" for i in range(64)]}, "^an edit holds at most 63 paraphrases, got 64$"),
])
def test_edits_that_cannot_be_made_are_refused_before_training(tmp_path, llama, tokenizer, kwargs, message):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer) as editor:
        with pytest.raises(ValidationError, match=message):
            editor.edit(PROMPT, " Lyon", TRAIN, **kwargs)
        assert editor.registry.count() == 0


@pytest.fixture
def sola(tmp_path, llama, tokenizer):
    path = tmp_path / "model"
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    registry = str(tmp_path / "reg")

    def invoke(*args, code=0):
        result = CliRunner().invoke(cli, ["--registry", registry, "--model", str(path), *args])
        assert result.exit_code == code, result.output
        return result

    invoke.registry = registry
    invoke("init")
    return invoke


def test_cli_edits_take_a_form_and_paraphrases(sola):
    [row] = json.loads(sola("edit", "--prompt", PROMPT, "--target", " Lyon", "--paraphrase", FAR, "--lr", "0.1",
                            "--max-steps", "300", "--margin", "0.5", "--json").stdout)
    assert row["paraphrases"] == [FAR] and row["info"]["form"] == "completion" and row["subject"] is None
    routes = json.loads(sola("route", FAR, "--json").stdout)
    assert routes == [{"prompt": FAR, "edit": row["id"]}]
    [told] = json.loads(sola("edit", "--prompt", "The largest planet is", "--target", " Saturn", "--subject",
                             "largest planet", "--max-steps", "5", "--json").stdout)
    assert json.loads(sola("show", str(told["id"]), "--json").stdout)["subject"] == "largest planet"


def test_cli_file_takes_questions_forms_and_paraphrases(sola, tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"question": "What is the capital of Japan?", "answer": "Osaka",
                                "paraphrases": ["Which city is Japan's capital?"]}) + "\n"
                    + json.dumps({"prompt": "The largest planet is", "target": " Saturn", "subject": "planet"}) + "\n")
    rows = json.loads(sola("edit", "--file", str(path), "--max-steps", "5", "--json").stdout)
    assert [(r["info"]["form"], r["paraphrases"], r["subject"]) for r in rows] == [
        ("question", ["Which city is Japan's capital?"], None), ("completion", [], "planet")]


@pytest.mark.parametrize("line, message", [
    ({"question": "Q?", "answer": "A", "paraphrases": "not a list"}, "line 1: paraphrases must be a JSON array of strings"),
    ({"prompt": "P", "target": " T", "paraphrases": ["  "]}, "line 1: paraphrase must be a non-empty string, not only whitespace"),
    ({"prompt": "P", "target": " T", "form": "poem"}, "line 1: form must be one of completion, question, chat, got 'poem'"),
    ({"question": "Q?", "answer": ""}, "line 1: answer must be a non-empty string, not only whitespace"),
    ({"prompt": "P", "target": " T", "subject": " "}, "line 1: subject must be a non-empty string, not only whitespace"),
    ({"prompt": "P is", "target": " T", "subject": "Q"}, "line 1: subject 'Q' is not in the prompt 'P is': give the words "
                                                          "it is named by there"),
    ({"question": "Q?\ud800", "answer": "A"}, "line 1: question is not valid Unicode text (it holds a lone surrogate)"),
    (["prompt", "target"], "line 1: expected a JSON object with prompt and target, or question and answer "
                           "(list indices must be integers or slices, not str)"),
])
def test_cli_bad_lines_are_refused_and_write_nothing(sola, tmp_path, line, message):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps(line) + "\n")
    result = sola("edit", "--file", str(path), code=1)
    assert result.output == f"Error: {path} {message}\n"
    with EditRegistry.open(sola.registry, readonly=True) as reg:
        assert reg.count() == 0


def test_cli_refuses_one_edit_options_with_a_file(sola, tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_text(json.dumps({"prompt": "P", "target": " T"}) + "\n")
    result = sola("edit", "--file", str(path), "--form", "question", code=2)
    assert "--form, --paraphrase and --subject describe one edit; in a --file, give them on each line" in result.output
