"""The quality harness and threshold calibration, on real facts and a tiny random Llama."""
import copy
import json

import pytest
import torch

from registry import EditRegistry
from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.calibrate import calibrate, choose_threshold
from sola_core.evaluate import SolaMethod, evaluate, evaluate_sola
from sola_core.facts import TEMPLATES, counterfacts


def test_fact_sets_are_deterministic_and_cover_every_relation():
    facts = counterfacts(40, seed=3)
    assert facts == counterfacts(40, seed=3) and facts != counterfacts(40, seed=4)
    assert {f.relation for f in facts} == set(TEMPLATES)
    edited = {f.prompt for f in facts}
    for f in facts:
        assert len(f.paraphrases) >= 3 and len(f.neighbours) >= 3
        assert f.target.strip() != f.true_object and f.target.startswith(" ")
        assert not edited & set(f.neighbours)  # neighbours are never edited themselves
    assert len(counterfacts(1000)) == 1000


# a tiny random model cannot also fit the end token of every one of 20 facts in 300 steps
SMALL_RUN = TrainConfig(lr=5e-2, max_steps=300, margin=0.5, end_token=False)


def test_small_run_meets_the_bars(tmp_path, llama, tokenizer):
    facts = counterfacts(20, seed=0)
    report = evaluate_sola(llama, tokenizer, facts, str(tmp_path / "r"),
                           config=EditConfig(key_source="layer", threshold=1e-4), train=SMALL_RUN)
    m = report.metrics
    assert m["edits"] == 20 and len(report.edits) == 20
    assert m["edit_success"] == 1.0 and m["retention"] == 1.0
    assert m["locality"] == 1.0 and m["neighbourhood_locality"] == 1.0
    assert m["rollback_fidelity"] == 1.0 and m["retention_after_rollback"] == 1.0
    assert m["rolled_back_routed_elsewhere"] == 0.0 and m["rollback_fidelity_unrouted"] == 1.0
    assert m["trainable_params_per_edit"] == 4 * (128 + 64)
    json.dumps(m)  # the report is JSON-safe


def test_batched_editing_measures_as_one_by_one(tmp_path, llama, tokenizer):
    facts, config = counterfacts(12, seed=0), EditConfig(key_source="layer", threshold=1e-4)
    alone, batched = (evaluate_sola(copy.deepcopy(llama), tokenizer, facts, str(tmp_path / f"r{b}"), config=config,
                                    train=SMALL_RUN, batch_size=b).metrics for b in (1, 5))
    timing = {"edit_seconds_median", "edit_seconds_p95"}
    assert {k: v for k, v in batched.items() if k not in timing} == {k: v for k, v in alone.items() if k not in timing}


def test_choose_threshold_keeps_outsiders_out():
    d = {"paraphrase": [0.01, 0.02, 0.5], "neighbour": [0.3, 0.4, 0.6, 0.9], "unrelated": [0.8]}
    r = choose_threshold(d, max_false_route=0.0)
    assert 0.02 < r["threshold"] < 0.3
    assert r["paraphrase_recall"] == pytest.approx(2 / 3) and r["false_route_rate"] == 0.0


def test_calibrate_stores_the_threshold_for_every_process(tmp_path, llama, tokenizer):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="layer")) as editor:
        other = EditRegistry.open(tmp_path / "r", readonly=True)
        result = calibrate(editor, counterfacts(12, seed=1), max_false_route=0.0)
        assert editor.registry.config.threshold == result["threshold"] != result["previous_threshold"]
        other.refresh()
        assert other.config.threshold == result["threshold"]
        other.close()
