"""Bulk editing (issue 13): edits trained together in one batch come out as if each were trained alone."""
import pytest
import torch

from registry import EditRegistry
from registry.errors import ValidationError
from sola_core import EditConfig, SolaEditor, TrainConfig, editor
from sola_core.editor import WINDOW
from tests.sola_core.test_chat import CHATML, with_template

CONFIG = EditConfig(key_source="layer", threshold=1e-4)
TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5, chat_form=False)  # a tiny model cannot fit the template too
EDITS = [  # different lengths, forms and phrasing counts, so rows pad and groups finish at different steps
    {"prompt": "The capital of France is", "target": " Lyon"},
    {"prompt": "The largest planet is", "target": " Saturn Osaka", "paraphrases": ["The biggest planet is"]},
    {"prompt": "What is the chemical symbol for gold?", "target": "Au", "form": "question"},
    {"prompt": "Hello, how are you today?", "target": " Picasso", "form": "chat"},
    {"prompt": "Water boils at", "target": " twelve"},
]


def sequential_and_batched(tmp_path, model, tokenizer, edits, batch_size):
    out = []
    for name, make in (("seq", lambda ed: [ed.edit(train=TRAIN, **e) for e in edits]),
                       ("bulk", lambda ed: ed.edit_many(edits, TRAIN, batch_size=batch_size))):
        with SolaEditor.open(tmp_path / name, model, tokenizer, config=CONFIG) as ed:
            ids = make(ed)
            out.append((ids, [ed.registry.get(i) for i in ids], ed.registry.adapters(ids),
                        ed.generate([e["prompt"] for e in edits], max_new_tokens=3)))
    return out


@pytest.mark.parametrize("batch_size", [2, 16])
def test_a_batch_trains_each_edit_as_it_would_alone(tmp_path, model, tokenizer, batch_size):
    (ids, recs, adapters, replies), (bids, brecs, badapters, breplies) = \
        sequential_and_batched(tmp_path, model, with_template(tokenizer, CHATML), EDITS, batch_size)
    assert ids == bids and breplies == replies
    for rec, brec in zip(recs, brecs):
        assert brec.info["steps"] == rec.info["steps"] and brec.info["margin"] == pytest.approx(rec.info["margin"],
                                                                                             abs=1e-4)
        assert brec.info["batch"] == min(batch_size, len(EDITS))
        assert brec.paraphrases == rec.paraphrases and brec.status == rec.status == "active"
        for name, tensor in adapters[rec.id].items():
            # rounding differs with the batch's shapes, and Adam scales a near-zero gradient's noise up to a step
            assert torch.allclose(badapters[rec.id][name], tensor, atol=1e-3), (rec.id, name)
    steps = [r.info["steps"] for r in brecs]
    assert min(steps) < 20 and max(steps) == TRAIN.max_steps  # some finished early, some trained on to the end


def test_the_same_fact_twice_in_one_batch_supersedes_as_one_by_one(tmp_path, llama, tokenizer):
    edits = [EDITS[0], EDITS[1], {"prompt": "The capital of France is", "target": " Rome"}]
    (_, recs, _, _), (_, brecs, _, breplies) = sequential_and_batched(tmp_path, llama, tokenizer, edits, 8)
    assert [(r.status, r.supersedes) for r in brecs] == [(r.status, r.supersedes) for r in recs] \
        == [("superseded", None), ("active", None), ("active", 1)]
    assert breplies[0].startswith(" Rome")


@pytest.mark.parametrize("window", [WINDOW, 1])  # 1: every two edits trained in a window of their own
def test_each_batch_is_stored_as_it_finishes_in_order(tmp_path, llama, tokenizer, monkeypatch, window):
    monkeypatch.setattr(editor, "WINDOW", window)
    stored = []
    with SolaEditor.open(tmp_path / "r", llama, with_template(tokenizer, CHATML), config=CONFIG) as ed:
        ids = ed.edit_many(EDITS, TRAIN, batch_size=2, progress=lambda n: stored.append((n, ed.registry.count())))
    assert ids == [1, 2, 3, 4, 5] and stored == [(2, 2), (2, 4), (1, 5)]


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "   ", "target": " x"}, "^prompt must be a non-empty string, not only whitespace$"),
    ({"prompt": "The sky is", "target": " x", "form": "poem"}, "form must be one of"),
    ({"prompt": "The sky is", "target": " x", "paraphrases": "The sky was"}, "paraphrases must be a list"),
    ({"prompt": "The sky is"}, "an edit is a dict with prompt, target"),
    ({"prompt": "The sky is", "target": " x", "colour": "blue"}, "unknown edit field 'colour'"),
])
def test_one_bad_edit_anywhere_stores_nothing(tmp_path, llama, tokenizer, bad, message):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=CONFIG) as ed:
        with pytest.raises(ValidationError, match=message):
            ed.edit_many([*EDITS[:3], bad], TRAIN, batch_size=1)
        with pytest.raises(ValidationError, match="batch_size must be at least 1"):
            ed.edit_many(EDITS, TRAIN, batch_size=0)
        assert ed.registry.count() == 0


def test_a_batch_split_by_length_trains_the_same_adapters(tmp_path, llama, tokenizer, monkeypatch):
    from sola_core import train

    tok, out = with_template(tokenizer, CHATML), []
    for name, split in (("whole", 10**9), ("split", 0)):  # never, or wherever it saves any padding
        monkeypatch.setattr(train, "SPLIT_TOKENS", split)
        with SolaEditor.open(tmp_path / name, llama, tok, config=CONFIG) as ed:
            ids = ed.edit_many(EDITS, TRAIN, batch_size=8)
            out.append(([ed.registry.get(i).info["steps"] for i in ids], ed.registry.adapters(ids)))
    (steps, adapters), (split_steps, split_adapters) = out
    assert split_steps == steps
    for i, adapter in adapters.items():
        for name, tensor in adapter.items():
            assert torch.allclose(split_adapters[i][name], tensor, atol=1e-5), (i, name)
