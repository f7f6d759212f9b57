"""End to end on tiny random GPT-2 and Llama models: edit, serve, roll back, restore, supersede, reopen."""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

from registry import EditRegistry
from registry.errors import ConfigMismatch, ValidationError
from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.layer import SolaLayer

# Exact prompts give identical keys; a random model's distinct prompts sit far further apart than this.
CONFIG = EditConfig(key_source="layer", threshold=1e-4)
TRAIN = TrainConfig(lr=5e-2, max_steps=200, margin=1.0)
UNRELATED = ["Hello, how are you today?", "The quick brown fox", "Water boils at"]


def open_editor(path, model, tokenizer, **kw) -> SolaEditor:
    return SolaEditor.open(path, model, tokenizer, config=CONFIG, **kw)


def greedy(editor, prompt, target):
    n = len(editor.tokenizer(target, add_special_tokens=False)["input_ids"])
    return editor.generate([prompt], max_new_tokens=n)[0]


def test_edit_produces_target_and_leaves_unrelated_prompts_bit_identical(tmp_path, model, tokenizer):
    with open_editor(tmp_path / "r", model, tokenizer) as editor:
        before = editor.logits(UNRELATED)
        eid = editor.edit("The capital of France is", " Lyon", TRAIN)
        assert greedy(editor, "The capital of France is", " Lyon") == " Lyon"
        assert editor.route(["The capital of France is", "Hello, how are you today?"]) == [eid, None]
        assert torch.equal(editor.logits(UNRELATED), before)
        assert [r.id for r in editor.edits()] == [eid]


def test_rollback_is_bit_identical_and_restore_brings_the_edit_back(tmp_path, model, tokenizer):
    prompt = "The largest planet is"
    with open_editor(tmp_path / "r", model, tokenizer) as editor:
        before = editor.logits([prompt])
        eid = editor.edit(prompt, " Saturn", TRAIN)
        edited = editor.logits([prompt])
        assert not torch.equal(edited, before)
        assert editor.rollback(eid).status == "rolled_back"
        assert torch.equal(editor.logits([prompt]), before)
        assert editor.route([prompt]) == [None]
        editor.restore(eid)
        assert torch.equal(editor.logits([prompt]), edited)
        assert greedy(editor, prompt, " Saturn") == " Saturn"


def test_newer_version_supersedes_and_its_rollback_brings_the_older_back(tmp_path, llama, tokenizer):
    prompt = "The capital of Japan is"
    with open_editor(tmp_path / "r", llama, tokenizer) as editor:
        v1 = editor.edit(prompt, " Osaka", TRAIN)
        v2 = editor.edit(prompt, " Rome", TRAIN)
        assert editor.registry.get(v1).status == "superseded"
        assert editor.registry.get(v2).supersedes == v1
        assert greedy(editor, prompt, " Rome") == " Rome"
        editor.rollback(v2)
        assert editor.route([prompt]) == [v1]
        assert greedy(editor, prompt, " Osaka") == " Osaka"


def test_mixed_padded_batch_routes_per_row(tmp_path, model, tokenizer):
    edits = [("The capital of France is", " Lyon"), ("Hi", " Paris")]  # different lengths: padding in a batch
    with open_editor(tmp_path / "r", model, tokenizer) as editor:
        ids = [editor.edit(p, t, TRAIN) for p, t in edits]
        prompts = ["The quick brown fox", edits[0][0], "Water boils at 100 degrees and more", edits[1][0]]
        assert editor.route(prompts) == [None, ids[0], None, ids[1]]
        batch = editor.generate(prompts, max_new_tokens=3)
        alone = [editor.generate([p], max_new_tokens=3)[0] for p in prompts]
        assert batch[1].startswith(" Lyon") and batch[3].startswith(" Paris")
        assert batch == alone


def test_fifty_sequential_edits_all_hold_after_the_last(tmp_path, llama, tokenizer):
    words = "one two three four five six seven eight nine ten".split()
    facts = [(f"Fact number {a} {b} is", f" {words[(i * 7) % 10]}") for i, (a, b) in
             enumerate((a, b) for a in words for b in words[:5])]
    assert len(facts) == 50
    with open_editor(tmp_path / "r", llama, tokenizer) as editor:
        base_weights = {n: p.clone() for n, p in llama.named_parameters()}
        ids = [editor.edit(p, t, TRAIN) for p, t in facts]
        first_adapter = editor.registry.adapter(ids[0])
        outputs = editor.generate([p for p, _ in facts], max_new_tokens=3)  # one batch, padded
        assert all(out.startswith(t) for out, (_, t) in zip(outputs, facts)), outputs
        assert editor.route([p for p, _ in facts]) == ids
        assert all(torch.equal(p, base_weights[n]) for n, p in llama.named_parameters())
        assert all(torch.equal(v, first_adapter[k]) for k, v in editor.registry.adapter(ids[0]).items())


def test_close_puts_the_original_modules_back(tmp_path, model, tokenizer):
    originals = {n: m for n, m in model.named_modules()}
    editor = open_editor(tmp_path / "r", model, tokenizer)
    assert any(isinstance(m, SolaLayer) for m in model.modules())
    editor.close()
    assert {n: m for n, m in model.named_modules()} == originals


def test_registry_for_another_model_is_refused(tmp_path, llama, tokenizer):
    open_editor(tmp_path / "r", copy.deepcopy(llama), tokenizer).close()
    with torch.no_grad():
        next(iter(llama.model.layers[-1].mlp.down_proj.parameters())).add_(1e-3)
    with pytest.raises(ConfigMismatch, match="weights differ"):
        open_editor(tmp_path / "r", llama, tokenizer)


def test_bad_edit_input_writes_nothing(tmp_path, llama, tokenizer):
    with open_editor(tmp_path / "r", llama, tokenizer) as editor:
        for prompt, target in [("   ", " x"), ("The capital", ""), ("word " * 200, " x")]:
            with pytest.raises(ValidationError):
                editor.edit(prompt, target, TRAIN)
        assert editor.registry.count() == 0


def test_edits_survive_a_fresh_process(tmp_path, llama, tokenizer):
    model_dir = tmp_path / "model"
    llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with open_editor(tmp_path / "r", llama, tokenizer) as editor:
        eid = editor.edit("The capital of Italy is", " Paris", TRAIN)
    script = textwrap.dedent(f"""
        from sola_core import SolaEditor, load_model
        model, tok = load_model({str(model_dir)!r})
        with SolaEditor.open({str(tmp_path / 'r')!r}, model, tok) as editor:
            print(editor.route(["The capital of Italy is"])[0], editor.generate(["The capital of Italy is"], 2)[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == f"{eid}  Paris"
