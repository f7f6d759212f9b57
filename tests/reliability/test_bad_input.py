"""Bad input: each mistake gets one `Error: ...` line, a non-zero exit, and nothing written.

"Nothing written" is checked on the bytes of the registry's data file (and, for a registry that does not
exist yet, on the path staying absent). Unwritable directories and read-only filesystems are real: a
child process without the root override capabilities, and a read-only bind mount in a private mount
namespace; both must still list and serve.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import (assert_one_error_line, bundle_parts, file_digest, invoke, run_cli_in, save_bundle,
                                 sola, tamper, tree)

LONG = " ".join(["Fact number one two three"] * 40)  # about 200 tokens; the tiny models' context is 128
FRANCE = "The capital of France is"

CASES = {
    "empty prompt": (["edit", "--prompt", "", "--target", " x"], "prompt must be a non-empty string, not only whitespace"),
    "blank prompt": (["edit", "--prompt", " \t ", "--target", " x"], "prompt must be a non-empty string, not only whitespace"),
    "empty target": (["edit", "--prompt", FRANCE, "--target", ""], "target must be a non-empty string, not only whitespace"),
    "blank target": (["edit", "--prompt", FRANCE, "--target", "\n  "], "target must be a non-empty string, not only whitespace"),
    "prompt too long": (["edit", "--prompt", LONG, "--target", " x"], "tokens; the model's context is 128"),
    "target too long": (["edit", "--prompt", FRANCE, "--target", LONG], "tokens; the model's context is 128"),
    "generate empty": (["generate", FRANCE, ""], "prompt must be a non-empty string, not only whitespace"),
    "route blank": (["route", "   "], "prompt must be a non-empty string, not only whitespace"),
    "generate too long": (["generate", LONG], "tokens; the model's context is 128"),
    "max new tokens 0": (["generate", FRANCE, "--max-new-tokens", "0"], "Invalid value for '--max-new-tokens'"),
    "show unknown": (["show", "99"], "no edit with id 99"),
    "rollback unknown": (["rollback", "99"], "no edit with id 99"),
    "restore unknown": (["restore", "99"], "no edit with id 99"),
    "negative id": (["rollback", "--", "-3"], "edit ids are integers from 0 to 2**63 - 1, got -3"),
    "huge id": (["show", str(2**70)], "edit ids are integers from 0 to 2**63 - 1"),
    "rollback twice": (["rollback", "2"], "edit 2 is already rolled back"),
    "restore active": (["restore", "1"], "edit 1 is already active"),
    "negative limit": (["list", "--limit", "-1"], "Invalid value for '--limit'"),
    "line break in an argument": (["list", "a\nb"], "Got unexpected extra argument (a\\nb)"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_arguments_are_one_error_line_and_write_nothing(registry_copy, model_dir, case):
    args, message = CASES[case]
    before = file_digest(registry_copy)
    result = invoke(*args, registry=registry_copy, model=model_dir)
    assert result.exit_code in (1, 2) and result.stdout == ""
    if result.exit_code == 1:
        assert_one_error_line(result.stderr, message)
    else:  # a usage error: Click's usage lines, then one Error line
        assert message in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
    assert file_digest(registry_copy) == before


def test_bad_edits_do_not_create_a_missing_registry(tmp_path, model_dir):
    path = str(tmp_path / "new")
    for args in (CASES["empty prompt"][0], CASES["blank target"][0], CASES["prompt too long"][0]):
        result = invoke(*args, registry=path, model=model_dir)
        assert result.exit_code == 1 and result.stderr.startswith("Error: ")
        assert not os.path.exists(path)


@pytest.mark.parametrize("which, message", [
    ("narrow", "belongs to another model: hidden_size is 32 but this registry was made for 64"),
    ("retrained", "belongs to another model: the edited layers' weights differ from the model this registry was made for"),
])
def test_a_registry_of_another_model_is_refused(registry_copy, narrow_model_dir, retrained_model_dir, which, message):
    other = narrow_model_dir if which == "narrow" else retrained_model_dir
    before = file_digest(registry_copy)
    for args in (["generate", FRANCE], ["edit", "--prompt", "The capital of Italy is", "--target", " Rome"]):
        result = invoke(*args, registry=registry_copy, model=other)
        assert result.exit_code == 1
        assert_one_error_line(result.stderr, message)
    assert file_digest(registry_copy) == before


def test_an_unknown_schema_version_is_refused(registry_copy, model_dir):
    tamper(registry_copy, "meta", "schema_version", lambda v: b"99")
    before = file_digest(registry_copy)
    for args in (["list"], ["rollback", "1"], ["generate", FRANCE]):
        result = invoke(*args, registry=registry_copy, model=model_dir)
        assert result.exit_code == 1
        assert_one_error_line(result.stderr, "registry schema version 99 is not supported by this version (expects 3)")
    assert file_digest(registry_copy) == before
    real = sola("list", registry=registry_copy)  # the same through a real process: exit status and stderr
    assert real.returncode == 1 and real.stdout == ""
    assert_one_error_line(real.stderr, "schema version 99")


def test_a_registry_path_that_is_a_file_or_not_a_registry(tmp_path, model_dir):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a registry")
    a_dir = tmp_path / "photos"
    a_dir.mkdir()
    (a_dir / "cat.jpg").write_bytes(b"\xff\xd8")
    snapshot = tree(tmp_path)
    for path, message in [(a_file, "is a file, not a registry directory"), (a_dir, "is not a registry")]:
        result = invoke("list", registry=str(path))
        assert result.exit_code == 1
        assert_one_error_line(result.stderr, message)
    for path, message in [(a_file, "is a file, not a registry directory"), (a_dir, "is not empty")]:
        for args in (["init"], ["edit", "--prompt", FRANCE, "--target", " Lyon"]):
            result = invoke(*args, registry=str(path), model=model_dir)
            assert result.exit_code == 1
            assert_one_error_line(result.stderr, message)
    assert tree(tmp_path) == snapshot


def write_jsonl(path: Path, lines: list[bytes | str]) -> str:
    path.write_bytes(b"\n".join(line.encode() if isinstance(line, str) else line for line in lines) + b"\n")
    return str(path)


GOOD = json.dumps({"prompt": "The capital of Japan is", "target": " Osaka"})
JSONL = {
    "broken json": ([GOOD, '{"prompt": "oops"'], 2, "expected a JSON object with prompt and target"),
    "not an object": ([GOOD, GOOD, "[1, 2]"], 3, "expected a JSON object with prompt and target"),
    "missing target": (['{"prompt": "x"}'], 1, "expected a JSON object with prompt and target"),
    "number target": ([GOOD, '{"prompt": "x", "target": 5}'], 2, "target must be a non-empty string, not only whitespace"),
    "blank prompt": (["", GOOD, '{"prompt": "  ", "target": " y"}'], 3, "prompt must be a non-empty string, not only whitespace"),
    "not utf-8": ([GOOD, b'{"prompt": "caf\xe9", "target": " x"}'], 2, "not valid UTF-8 text"),
    "deep nesting": ([GOOD, "[" * 100000], 2, "expected a JSON object with prompt and target"),
    "lone surrogate": ([GOOD, '{"prompt": "a\\ud800", "target": " x"}'], 2, "prompt is not valid Unicode text (it holds a lone surrogate)"),
    "too long": ([GOOD, GOOD, json.dumps({"prompt": LONG, "target": " x"})], 3, "tokens; the model's context is 128"),
}


@pytest.mark.parametrize("case", JSONL)
def test_malformed_jsonl_names_the_line_and_keeps_nothing(registry_copy, model_dir, tmp_path, case):
    lines, line_no, message = JSONL[case]
    path = write_jsonl(tmp_path / "edits.jsonl", lines)
    before = file_digest(registry_copy)
    result = invoke("edit", "--file", path, registry=registry_copy, model=model_dir)
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, f"{path} line {line_no}: ")
    assert message in result.stderr
    assert file_digest(registry_copy) == before  # the good lines before it were not kept either


def test_bad_bundles_are_refused_and_import_nothing(registry_copy, retrained_model_dir, tmp_path):
    good = str(tmp_path / "good.safetensors")
    assert invoke("export", good, "--status", "active", registry=registry_copy).exit_code == 0
    manifest, tensors = bundle_parts(good)
    foreign = str(tmp_path / "foreign")
    for args in (["init", "--key-source", "layer", "--threshold", "0.0001"],
                 ["edit", "--prompt", FRANCE, "--target", " Lyon", "--max-steps", "2"], ["export", str(tmp_path / "foreign.safetensors")]):
        assert invoke(*args, registry=foreign, model=retrained_model_dir).exit_code == 0
    nan = {**tensors, "0.0.B": torch.full_like(tensors["0.0.B"], float("nan"))}
    inf = {**tensors, "0.0.A": torch.full_like(tensors["0.0.A"], float("inf"))}
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    cases = {
        save_bundle(tmp_path / "badjson.safetensors", tensors, raw_manifest="{oops"): "has a bad manifest",
        save_bundle(tmp_path / "norecords.safetensors", tensors, {**manifest, "records": None}): "has a bad manifest",
        save_bundle(tmp_path / "format.safetensors", tensors, {**manifest, "format": 7}): "has bundle format 7",
        str(tmp_path / "foreign.safetensors"): "bundle was made for another model or setup: its fingerprint differs",
        save_bundle(tmp_path / "nan.safetensors", nan, manifest): "bundle edit 0 adapter tensor '0.B' contains NaN or infinite",
        save_bundle(tmp_path / "inf.safetensors", inf, manifest): "bundle edit 0 adapter tensor '0.A' contains NaN or infinite",
        str(tmp_path / "junk.safetensors"): "is not a readable SoLA bundle",
    }
    before = file_digest(registry_copy)
    for path, message in cases.items():
        result = invoke("import", path, registry=registry_copy)
        assert result.exit_code == 1, path
        assert_one_error_line(result.stderr, message)
    assert file_digest(registry_copy) == before


def read_only_commands(path: str, model: str) -> tuple[list, list]:
    base = ["--registry", path, "--model", model]
    reads = [[*base, "list", "--json"], [*base, "show", "1"], [*base, "stats"], [*base, "verify"],
             [*base, "generate", FRANCE, "--max-new-tokens", "2"], [*base, "route", FRANCE, "--json"]]
    writes = [[*base, "rollback", "1"], [*base, "restore", "2"], [*base, "verify", "--repair"],
              [*base, "edit", "--prompt", "The capital of Italy is", "--target", " Rome", "--max-steps", "2"]]
    return reads, writes


def check_read_only_use(results: list[dict], n_reads: int, message: str) -> None:
    for result in results[:n_reads]:  # reading and serving still work
        assert result["exit_code"] == 0 and result["stderr"] == "", result
    assert [r["edit"] for r in json.loads(results[5]["stdout"])] == [1]  # edit 1 still routes
    for result in results[n_reads:]:  # every write: one clear line, exit 1
        assert result["exit_code"] == 1 and result["stdout"] == "", result
        assert_one_error_line(result["stderr"], message)


def test_an_unwritable_registry_still_lists_and_serves(registry_copy, model_dir, tmp_path):
    """A process without root's permission override (the tests run as root, so chmod alone would not bite)."""
    # root ignores file modes, so as root the child drops the capabilities that let it (setpriv)
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    if prefix and (shutil.which("setpriv") is None or subprocess.run([*prefix, "true"]).returncode != 0):
        pytest.skip("cannot drop root's permission override here")
    locked = tmp_path / "locked"
    locked.mkdir()
    for path in [*Path(registry_copy).iterdir(), Path(registry_copy), locked]:
        path.chmod(0o444 if path.is_file() else 0o555)
    before = file_digest(registry_copy)
    reads, writes = read_only_commands(registry_copy, model_dir)
    create = [["--registry", str(locked / "reg"), "--model", model_dir, "init"]]
    try:
        results = run_cli_in(reads + writes + create, prefix)
    finally:
        for path in [Path(registry_copy), *Path(registry_copy).iterdir(), locked]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    check_read_only_use(results[:-1], len(reads), "is not writable (read-only filesystem or no permission)")
    assert_one_error_line(results[-1]["stderr"], f"cannot create a registry at {locked / 'reg'}: Permission denied")
    assert file_digest(registry_copy) == before and list(locked.iterdir()) == []


def test_a_registry_on_a_read_only_filesystem_still_lists_and_serves(registry_copy, model_dir):
    """A read-only bind mount of the registry in a private mount namespace (invisible to everything else)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("mount namespaces are not available here")
    before = file_digest(registry_copy)
    reads, writes = read_only_commands(registry_copy, model_dir)
    mount = f"mount --bind {registry_copy} {registry_copy} && mount -o remount,bind,ro {registry_copy} && exec \"$@\""
    results = run_cli_in(reads + writes, ["unshare", "-m", "sh", "-c", mount, "sh"])
    check_read_only_use(results, len(reads), "is not writable (read-only filesystem or no permission)")
    assert file_digest(registry_copy) == before
