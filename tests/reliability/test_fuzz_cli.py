"""Property-based: whatever the arguments or the JSONL, the CLI answers with output or one error line,
never a traceback, and the registry stays consistent (a refused command writes nothing)."""
from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from reliability_helpers import file_digest, invoke

from registry import EditRegistry

COMMANDS = ["list", "show", "rollback", "restore", "stats", "verify", "export", "import", "route", "generate",
            "edit", "init"]
# any character, lone surrogates included; no path separators, so nothing lands outside the test's directory
TEXT = st.text(st.characters(exclude_categories=(), exclude_characters="/\\"), max_size=12)
TOKEN = st.one_of(
    TEXT,
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["--json", "--status", "--limit", "--prompt", "--target", "--file", "--max-steps", "--lr",
                     "--max-new-tokens", "--repair", "--with-model", "--threshold", "--rank", "--metric", "--layers",
                     "--help", "--", "-x"]),
    st.sampled_from(["active", "rolled_back", "superseded", "1", "2", "0", "-1", "nan", "inf", "1e309", "",
                     "The capital of France is", " Lyon", "good.jsonl", "bad.jsonl", "out.safetensors"]),
)


def opt(name: str, values) -> st.SearchStrategy[list[str]]:
    """Either nothing or `name value`."""
    return st.one_of(st.just([]), values.map(lambda value: [name, value]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def joined(*parts) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda lists: [token for part in lists for token in part])


NUMBER = st.one_of(st.integers(-3, 5).map(str), st.integers(-2**70, 2**70).map(str),
                   st.sampled_from(["nan", "inf", "-inf", "1e309", "0.5", "0x10"]), TEXT)
PROMPT = st.one_of(TEXT, st.sampled_from(["The capital of France is", "The largest planet is", "Hello"]))
FILE = st.one_of(TEXT, st.sampled_from(["good.jsonl", "bad.jsonl", "out.safetensors", "missing.jsonl"]))
STATUS = st.one_of(st.sampled_from(["active", "superseded", "rolled_back"]), TEXT)
# well-formed shapes of each command with random values (random token lists mostly stop at the parser)
SHAPED = {
    "list": joined(opt("--status", STATUS), opt("--limit", NUMBER), flag("--json")),
    "show": joined(flag("--json"), st.just(["--"]), NUMBER.map(lambda n: [n])),
    "rollback": joined(flag("--json"), st.just(["--"]), NUMBER.map(lambda n: [n])),
    "restore": joined(flag("--json"), st.just(["--"]), NUMBER.map(lambda n: [n])),
    "stats": flag("--json"),
    "verify": joined(flag("--repair"), flag("--with-model"), flag("--json")),
    "export": joined(opt("--status", STATUS), FILE.map(lambda f: [f])),
    "import": joined(flag("--json"), FILE.map(lambda f: [f])),
    "route": joined(flag("--json"), st.lists(PROMPT, min_size=1, max_size=3)),
    "generate": joined(flag("--json"), st.lists(PROMPT, min_size=1, max_size=3)),
    "edit": st.one_of(joined(PROMPT.map(lambda p: ["--prompt", p]), PROMPT.map(lambda t: ["--target", t]),
                             opt("--lr", NUMBER), flag("--json")),
                      joined(opt("--file", FILE), opt("--max-steps", NUMBER))),
    "init": joined(opt("--threshold", NUMBER), opt("--rank", NUMBER), opt("--metric", TEXT), opt("--layers", TEXT)),
}
FUZZ = settings(max_examples=int(os.environ.get("SOLA_FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def check_outcome(result, path: str, before: str) -> None:
    """No traceback; 0, 1 (one `Error:` line) or 2 (usage); a failure wrote nothing; verify passes."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code == 1:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    if result.exit_code == 2:
        assert result.stderr.strip().splitlines()[-1].startswith("Error: "), result.stderr
    if result.exit_code != 0:
        assert file_digest(path) == before
    with EditRegistry.open(path, readonly=True) as reg:
        assert reg.verify().ok


@given(call=st.one_of(
    st.sampled_from(COMMANDS).flatmap(lambda command: SHAPED[command].map(lambda args: [command, *args])),
    st.tuples(st.sampled_from(COMMANDS), st.lists(TOKEN, max_size=5)).map(lambda ct: [ct[0], *ct[1]]),
))
@example(call=["list", "\r"])  # user text echoed in an error must not break it into lines
@example(call=["show", "--", "-1"])
@FUZZ
def test_any_arguments_give_output_or_one_error_line(registry_copy, model_dir, tmp_path, monkeypatch, call):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "good.jsonl").write_text('{"prompt": "The capital of Japan is", "target": " Osaka"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "The capital of Japan is"\n')
    command, args = call[0], list(call)
    if command == "edit":
        args += ["--max-steps", "1"]  # keep training short; a later "--" turns this into a usage error
    if command == "generate":
        args += ["--max-new-tokens", "2"]
    before = file_digest(registry_copy)
    result = invoke(*args, registry=registry_copy, model=model_dir)
    event(f"{command} exit {result.exit_code}")  # see --hypothesis-show-statistics
    check_outcome(result, registry_copy, before)


NICE = st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=10).filter(str.strip)
VALID = st.builds(lambda p, t: json.dumps({"prompt": p, "target": t}), NICE, NICE)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["prompt", "target", "x"]), inner,
                                                                max_size=3),
    max_leaves=6).map(json.dumps)
LINE = st.one_of(VALID, VALID, JSON_VALUE, st.text(max_size=20), st.sampled_from(["", "  ", "\t", "{}", "[]", "null"]),
                 st.binary(max_size=20)).map(lambda line: line if isinstance(line, bytes) else line.encode())
LINES = st.lists(LINE.filter(lambda line: b"\n" not in line), min_size=1, max_size=4)


def first_bad_line(lines: list[bytes]) -> int | None:
    """The documented rule: every non-blank line is a UTF-8 JSON object with non-blank string prompt and target."""
    for n, raw in enumerate(lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return n
        if not text.strip():
            continue
        try:
            item = json.loads(text)
            prompt, target = item["prompt"], item["target"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            return n
        if not (isinstance(prompt, str) and isinstance(target, str) and prompt.strip() and target.strip()):
            return n
        try:
            (prompt + target).encode("utf-8")
        except UnicodeEncodeError:
            return n
    return None


@given(lines=LINES)
@FUZZ
def test_any_jsonl_is_all_edited_or_refused_at_its_first_bad_line(registry_copy, model_dir, tmp_path, lines):
    path = tmp_path / "edits.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    before = file_digest(registry_copy)
    with EditRegistry.open(registry_copy, readonly=True) as reg:
        count, held = reg.count(), {(r.prompt, r.target) for r in reg.records()}
    result = invoke("edit", "--file", str(path), "--max-steps", "1", registry=registry_copy, model=model_dir)
    check_outcome(result, registry_copy, before)
    bad = first_bad_line(lines)
    event("all edited" if bad is None else "refused")
    if bad is None:
        assert result.exit_code == 0, result.output
        with EditRegistry.open(registry_copy, readonly=True) as reg:
            new = [json.loads(line) for line in lines if line.decode().strip()]
            # a line the registry held before the run is skipped (documented: re-running a file adds what is missing)
            assert reg.count() == count + sum((e["prompt"], e["target"]) not in held for e in new)
    else:
        assert result.exit_code == 1 and result.stderr.startswith(f"Error: {path} line {bad}: "), result.stderr
