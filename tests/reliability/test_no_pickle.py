"""Security: nothing is ever unpickled, and importing a bundle writes nowhere but the registry."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
from reliability_helpers import HERE, REPO, bundle_parts, child_env, invoke, save_bundle, tree

from registry import EditRegistry

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_CALLS = {("torch", "load"), ("np", "load"), ("numpy", "load"), ("pd", "read_pickle")}


def unsafe_uses(source: str) -> list[str]:
    """Imports of pickling modules and calls that unpickle (torch.load, np.load, weights_only=False)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in UNSAFE_CALLS:
                    found.append(f"{func.value.id}.{func.attr}")
            for kw in node.keywords:
                if kw.arg in ("weights_only", "allow_pickle", "trust_remote_code") and \
                        isinstance(kw.value, ast.Constant) and kw.value.value is (kw.arg != "weights_only"):
                    found.append(f"{kw.arg}={kw.value.value}")
    return found


def test_the_scanner_finds_what_it_looks_for():
    assert unsafe_uses("import pickle\nfrom joblib import load\ntorch.load(f, weights_only=False)\nnp.load(f)") == [
        "pickle", "joblib", "torch.load", "weights_only=False", "np.load"]


@pytest.mark.parametrize("package", ["registry", "sola_core"])
def test_no_module_can_unpickle(package):
    for path in sorted((REPO / package).rglob("*.py")):
        assert unsafe_uses(path.read_text()) == [], path


def test_a_whole_session_unpickles_nothing(registry_copy, model_dir, tmp_path):
    """Every command, in one process that records each unpickling attempt (audit hook + wrappers)."""
    base = ["--registry", registry_copy, "--model", model_dir]
    bundle = str(tmp_path / "b.safetensors")
    commands = [[*base, "edit", "--prompt", "The capital of Italy is", "--target", " Rome", "--max-steps", "2"],
                [*base, "generate", "The capital of France is", "--max-new-tokens", "2"],
                [*base, "route", "The capital of France is"], [*base, "list"], [*base, "show", "1"],
                [*base, "export", bundle], [*base, "import", bundle], [*base, "rollback", "1"],
                [*base, "restore", "1"], [*base, "stats"], [*base, "verify", "--with-model"]]
    argv = [sys.executable, str(HERE / "reliability_workers.py"), "nopickle", json.dumps(commands)]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert [r["exit_code"] for r in report["results"]] == [0] * len(commands), report["results"]
    assert report["unpickled"] == []
    assert report["canary"] == ["pickle.loads", "pickle.find_class"]  # the recorder does see a real unpickle


def test_importing_a_bundle_writes_nowhere_else(registry_copy, tmp_path, monkeypatch):
    """Manifest fields that look like paths are just text; tensor names that do are refused."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    good = str(tmp_path / "good.safetensors")
    assert invoke("export", good, registry=registry_copy).exit_code == 0
    manifest, tensors = bundle_parts(good)
    manifest["records"][0].update(id="../../../../tmp/escape", prompt="../../etc/passwd",
                                  info={"path": "/tmp/owned", "file": "../../x.safetensors"})
    sneaky = save_bundle(tmp_path / "sneaky.safetensors", tensors, manifest)
    named = {("../../" + name if name.endswith(".key") else name): t for name, t in tensors.items()}
    traversal = save_bundle(tmp_path / "traversal.safetensors", named, manifest)
    before, siblings = tree(tmp_path), sorted(tmp_path.parent.iterdir())

    refused = invoke("import", traversal, registry=registry_copy)
    assert refused.exit_code == 1 and "bundle tensors do not match its manifest" in refused.stderr
    imported = invoke("import", sneaky, "--json", registry=registry_copy)
    assert imported.exit_code == 0, imported.output
    new_id = json.loads(imported.stdout)["imported"][0]

    after = tree(tmp_path)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed <= {"reg/data.mdb", "reg/lock.mdb"}, changed
    assert sorted(tmp_path.parent.iterdir()) == siblings and list(workdir.iterdir()) == []
    assert not Path("/tmp/escape").exists() and not Path("/tmp/owned").exists()
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        rec = reg.get(new_id)
        assert rec.prompt == "../../etc/passwd" and rec.info["imported_from_id"] == "../../../../tmp/escape"


def test_export_writes_only_the_named_file(registry_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert invoke("export", str(out / "sub.safetensors"), registry=registry_copy).exit_code == 0
    assert [p.name for p in out.iterdir()] == ["sub.safetensors"]  # no temporary file left behind
    failed = invoke("export", str(out / "missing-dir" / "x.safetensors"), registry=registry_copy)
    assert failed.exit_code == 1 and failed.stderr.startswith("Error: ")
    assert [p.name for p in out.iterdir()] == ["sub.safetensors"]
    with safetensors.safe_open(str(out / "sub.safetensors"), "pt") as f:
        assert f.metadata()["sola_bundle"] == "1"
