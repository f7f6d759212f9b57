"""The `sola` CLI through CliRunner (state set up and checked through the API) and once as a real subprocess."""
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from registry import EditRegistry
from sola_core.cli import cli
from sola_core.keys import native_bf16


@pytest.fixture
def model_dir(tmp_path, llama, tokenizer):
    path = tmp_path / "model"
    llama.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def run(tmp_path, model_dir):
    runner = CliRunner()
    registry = str(tmp_path / "reg")

    def invoke(*args, ok=True):
        result = runner.invoke(cli, ["--registry", registry, "--model", model_dir, *args])
        if ok:
            assert result.exit_code == 0, result.output
        return result

    invoke.registry = registry
    return invoke


EDIT = ["edit", "--prompt", "The capital of France is", "--target", " Lyon", "--lr", "0.05", "--max-steps", "200"]


def init(run):
    run("init", "--key-source", "layer", "--threshold", "0.0001")


def test_init_edit_route_list_show(run):
    created = json.loads(run("init", "--key-source", "layer", "--threshold", "0.0001", "--json").stdout)
    assert created == {"path": run.registry, "layers": ["model.layers.2.mlp.down_proj"], "key_source": "layer",
                       "threshold": 0.0001}
    edited = json.loads(run(*EDIT, "--json").stdout)
    assert [(r["status"], r["target"]) for r in edited] == [("active", " Lyon")]
    eid = edited[0]["id"]
    routes = json.loads(run("route", "The capital of France is", "Hello", "--json").stdout)
    assert routes == [{"prompt": "The capital of France is", "edit": eid}, {"prompt": "Hello", "edit": None}]
    assert run("generate", "The capital of France is", "--max-new-tokens", "2").stdout.startswith(
        "The capital of France is Lyon")
    listed = json.loads(run("list", "--json").stdout)
    assert [r["id"] for r in listed] == [eid]
    assert json.loads(run("show", str(eid), "--json").stdout)["prompt"] == "The capital of France is"
    assert "The capital of France is" in run("list").output


def test_rollback_restore_stats_verify_without_a_model(run, tmp_path):
    init(run)
    eid = json.loads(run(*EDIT, "--json").stdout)[0]["id"]
    bad_model = CliRunner().invoke(cli, ["--registry", run.registry, "--model", str(tmp_path / "nope"), "rollback", str(eid)])
    assert bad_model.exit_code == 0, bad_model.output  # no model is loaded for admin commands
    assert bad_model.output == f"rolled back edit {eid}\n"
    with EditRegistry.open(run.registry, readonly=True) as reg:
        assert reg.get(eid).status == "rolled_back"
    assert json.loads(run("restore", str(eid), "--json").stdout)["status"] == "active"
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["key_dim"] == 128
    report = json.loads(run("verify", "--json").stdout)
    assert report["ok"] and report["checked"] >= 1


def test_export_import_round_trip(run, tmp_path):
    init(run)
    eid = json.loads(run(*EDIT, "--json").stdout)[0]["id"]
    bundle = str(tmp_path / "edits.safetensors")
    assert run("export", bundle).output == f"exported 1 edits to {bundle}\n"
    run("rollback", str(eid))
    imported = json.loads(run("import", bundle, "--json").stdout)["imported"]
    assert len(imported) == 1
    assert json.loads(run("route", "The capital of France is", "--json").stdout)[0]["edit"] == imported[0]


def test_export_as_peft_adapters(run, tmp_path):
    init(run)
    eid = json.loads(run(*EDIT, "--json").stdout)[0]["id"]
    out = tmp_path / "peft"
    result = json.loads(run("export", "--format", "peft", "--base-model", "tiny", str(out), "--json").stdout)
    (row,) = result["adapters"]
    assert result["exported"] == 1 and row["edit_id"] == eid
    assert json.loads((out / row["name"] / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert json.loads((out / "index.json").read_text())["adapters"] == [row]
    failed = run("export", str(out), ok=False)  # a bundle is one file
    assert failed.exit_code == 2 and f"{out} is a directory; a bundle is one file (or say --format peft)" in failed.output


@pytest.mark.parametrize("args, message", [
    (["show", "99"], "Error: no edit with id 99"),
    (["rollback", "99"], "Error: no edit with id 99"),
    (["edit", "--prompt", "x"], "Error: "),
])
def test_user_errors_are_one_line_and_exit_nonzero(run, args, message):
    init(run)
    result = run(*args, ok=False)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_rollback_twice_is_refused(run):
    init(run)
    eid = json.loads(run(*EDIT, "--json").stdout)[0]["id"]
    run("rollback", str(eid))
    result = run("rollback", str(eid), ok=False)
    assert result.exit_code == 1 and "already rolled back" in result.output


def test_missing_registry_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["--registry", str(tmp_path / "none"), "list"])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    result = CliRunner(env={"SOLA_REGISTRY": ""}).invoke(cli, ["list"])
    assert result.exit_code == 2 and "no registry given" in result.output


def test_bad_jsonl_line_names_the_line_and_writes_nothing(run, tmp_path):
    init(run)
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "The capital of Japan is", "target": " Osaka"}\n{"prompt": "oops"\n')
    result = run("edit", "--file", str(path), ok=False)
    assert result.exit_code == 1 and f"{path} line 2:" in result.output
    with EditRegistry.open(run.registry, readonly=True) as reg:
        assert reg.count() == 0


def test_edit_file_with_progress(run, tmp_path):
    init(run)
    path = tmp_path / "edits.jsonl"
    path.write_text('{"prompt": "The capital of Japan is", "target": " Osaka"}\n\n'
                    '{"prompt": "The largest planet is", "target": " Saturn"}\n')
    result = run("edit", "--file", str(path), "--lr", "0.05", "--max-steps", "200", "--json")
    rows = json.loads(result.stdout)
    assert [r["target"] for r in rows] == [" Osaka", " Saturn"]
    assert "editing: 2/2 (" in result.stderr  # not a terminal: progress as lines, not Click's silent bar
    assert [r["info"]["batch"] for r in rows] == [2, 2]  # trained together (--batch-size 16)


def test_running_a_file_again_adds_only_what_is_missing(run, tmp_path):
    init(run)
    path = tmp_path / "edits.jsonl"
    lines = ['{"prompt": "The capital of Japan is", "target": " Osaka"}',
             '{"prompt": "The largest planet is", "target": " Saturn"}']
    path.write_text(lines[0] + "\n")
    run("edit", "--file", str(path), "--max-steps", "5")
    path.write_text("\n".join(lines) + "\n")
    result = run("edit", "--file", str(path), "--max-steps", "5", "--batch-size", "1", "--json")
    assert "skipped 1 of 2 edits: the registry already holds their prompt and target" in result.stderr
    assert [r["target"] for r in json.loads(result.stdout)] == [" Saturn"]
    again = run("edit", "--file", str(path), "--max-steps", "5", "--json")
    assert json.loads(again.stdout) == [] and "skipped 2 of 2" in again.stderr
    with EditRegistry.open(run.registry, readonly=True) as reg:
        assert reg.count() == 2


def test_real_subprocess(tmp_path, model_dir):
    env = {**os.environ, "SOLA_REGISTRY": str(tmp_path / "reg"), "SOLA_MODEL": model_dir}
    sola = [sys.executable, "-m", "sola_core"]
    subprocess.run([*sola, "init", "--key-source", "layer", "--threshold", "0.0001"], env=env, check=True, capture_output=True)
    out = subprocess.run([*sola, *EDIT, "--json"], env=env, check=True, capture_output=True, text=True).stdout
    eid = json.loads(out)[0]["id"]
    listed = subprocess.run([*sola, "list", "--json"], env=env, check=True, capture_output=True, text=True).stdout
    assert [r["id"] for r in json.loads(listed)] == [eid]
    bad = subprocess.run([*sola, "show", "12345"], env=env, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == "Error: no edit with id 12345"


def test_eval_reports_every_metric(run):
    metrics = json.loads(run("eval", "--edits", "4", "--key-source", "layer", "--threshold", "0.0001", "--json").stdout)
    assert metrics["edits"] == 4 and metrics["key_source"] == "layer"
    for name in ("edit_success", "retention", "generalization", "locality", "neighbourhood_locality",
                 "rollback_fidelity", "edit_seconds_median", "adapter_bytes_per_edit"):
        assert 0 <= metrics[name] <= 1 or name in ("edit_seconds_median", "adapter_bytes_per_edit")
    assert metrics["rollback_fidelity"] == 1.0 and metrics["locality"] == 1.0


def test_calibrate_dry_run_leaves_the_threshold(run):
    init(run)
    result = json.loads(run("calibrate", "--facts", "6", "--dry-run", "--json").stdout)
    assert result["previous_threshold"] == 0.0001 and result["paraphrases"] == 18
    assert json.loads(run("stats", "--json").stdout)["threshold"] == 0.0001
    stored = json.loads(run("calibrate", "--facts", "6", "--json").stdout)["threshold"]
    assert json.loads(run("stats", "--json").stdout)["threshold"] == stored


def test_what_an_edit_trains_on_is_chosen_on_the_command_line(run, model_dir):
    """The model dir's tokenizer gets a chat template: by default an edit also trains its chat form."""
    from tests.sola_core.test_chat import CHATML

    config_path = os.path.join(model_dir, "tokenizer_config.json")
    with open(config_path) as f:
        settings = json.load(f)
    with open(config_path, "w") as f:
        json.dump({**settings, "chat_template": CHATML}, f)
    init(run)
    both = json.loads(run(*EDIT, "--json").stdout)[0]
    bare = json.loads(run("edit", "--prompt", "Water boils at", "--target", " Rome", "--no-chat-form",
                          "--no-end-token", "--no-question-form", "--max-steps", "5", "--json").stdout)[0]
    assert both["info"]["examples"] == 3 and bare["info"]["examples"] == 1  # bare, chat, asked as a question
    # a question also trains framed as a QA exchange (bare, chat, QA), a question edit whatever its punctuation
    asked = json.loads(run("edit", "--prompt", "Where does water boil?", "--target", " Rome", "--max-steps", "5",
                           "--json").stdout)[0]
    form = json.loads(run("edit", "--prompt", "Name the city where water boils", "--target", "Rome", "--form",
                          "question", "--max-steps", "5", "--json").stdout)[0]
    plain = json.loads(run("edit", "--prompt", "Where does ice melt?", "--target", " Rome", "--no-qa-form",
                           "--max-steps", "5", "--json").stdout)[0]
    assert (asked["info"]["examples"], form["info"]["examples"], plain["info"]["examples"]) == (3, 3, 2)
    # how it trains: bfloat16 autocast, float32, by default what the hardware computes natively; or a clear error
    half = json.loads(run(*EDIT, "--train-dtype", "bfloat16", "--json").stdout)[0]
    full = json.loads(run(*EDIT, "--train-dtype", "float32", "--json").stdout)[0]
    native = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"
    assert (half["info"]["dtype"], full["info"]["dtype"], both["info"]["dtype"]) == ("bfloat16", "float32", native)
    refused = run(*EDIT, "--train-dtype", "float16", ok=False)
    assert refused.exit_code == 2 and "'float16' is not one of 'auto', 'float32', 'bfloat16'" in refused.output
    lowered = run(*EDIT, "--loss-margin", "-1", ok=False)
    assert lowered.exit_code != 0 and "loss margin must be >= 0, got -1.0" in lowered.output
