"""Worker processes for the reliability suite (run as a script, never collected by pytest).

    python reliability_workers.py zygote MODEL_DIR          fork JOBS on request (JSON lines on stdin/stdout)
    python reliability_workers.py serve MODEL_DIR REGISTRY   a serving SolaEditor answering JSON lines

Workers report through append-only progress files: one JSON object per `write`, so a SIGKILL can
cut off a report but never garble one.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
UNPICKLED: list[tuple[str, str]] = []  # (what, detail) for every unpickling attempt, in `nopickle` mode


def record_unpickling() -> None:
    """Record every unpickling attempt in this process: an audit hook sees any class an unpickler looks up
    (C or Python), and wrappers see the entry points even for plain data. Installed before other imports."""
    import pickle

    def hook(event: str, args: tuple) -> None:
        if event == "pickle.find_class":
            UNPICKLED.append(("pickle.find_class", f"{args[0]}.{args[1]}"))

    sys.addaudithook(hook)
    spy(pickle, "load", "pickle.load")
    spy(pickle, "loads", "pickle.loads")
    original = pickle.Unpickler

    class RecordingUnpickler(original):
        def __init__(self, *args, **kwargs):
            UNPICKLED.append(("pickle.Unpickler", ""))
            super().__init__(*args, **kwargs)

    pickle.Unpickler = RecordingUnpickler


def spy(owner, name: str, what: str) -> None:
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        UNPICKLED.append((what, ""))
        return original(*args, **kwargs)

    setattr(owner, name, recorded)


if __name__ == "__main__" and sys.argv[1:2] == ["nopickle"]:
    record_unpickling()

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from registry import EditRegistry  # noqa: E402
from registry.codec import adapter_shapes  # noqa: E402
from registry.store import Store, Txn  # noqa: E402
from registry.transaction import Transaction  # noqa: E402
from sola_core import SolaEditor, TrainConfig  # noqa: E402
from sola_core.models import load_model  # noqa: E402

QUICK = TrainConfig(lr=0.05, max_steps=6, margin=0.5)  # crash tests: the write matters, not the fit
FIT = TrainConfig(lr=0.05, max_steps=80, margin=0.5)  # soak: readers check the generated target
FACTS = ["The capital of France is", "The capital of Japan is", "The largest planet is"]
TARGETS = [" Lyon", " Osaka", " Saturn", " Rome", " Paris", " Tokyo"]


class Progress:
    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **fields) -> None:
        os.write(self._fd, (json.dumps(fields) + "\n").encode())


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, after: int) -> None:
    """SIGKILL this process at a chosen point of its next write.

    put: at the after-th value written inside the open write transaction; finish: with every value
    written but not committed; apply: just after the commit, before the in-memory index is updated.
    """
    if point == "put":
        put, calls = Txn.put, [0]

        def counting_put(self, *args):
            calls[0] += 1
            if calls[0] >= after:
                _die()
            return put(self, *args)

        Txn.put = counting_put
    elif point == "finish":
        finish = Transaction.finish
        Transaction.finish = lambda self, op: (finish(self, op), _die())[0]
    elif point == "apply":
        write = Store.write
        Store.write = lambda self, body: (write(self, body), _die())[0]  # committed, not yet applied
    else:
        raise ValueError(point)


def crash_ops(model, tokenizer, path: str, op: str, seed: int, progress: str, bundle: str | None = None,
              inject: list | None = None) -> None:
    """Run `op` (edit, rollback, restore or import) over and over until killed, reporting each commit."""
    out, rng = Progress(progress), random.Random(seed)
    editor = SolaEditor.open(path, model, tokenizer) if op == "edit" else None
    reg = editor.registry if editor else EditRegistry.open(path)
    if inject:
        arm(*inject)
    out.write(event="start", generation=reg.generation)
    for i in range(10**9):
        start = time.monotonic()
        if op == "edit":
            prompt = rng.choice(FACTS) if i % 3 == 2 else f"Fact number {seed} {i} is"
            result = editor.edit(prompt, rng.choice(TARGETS), QUICK)
        elif op == "import":
            result = reg.import_(bundle)
        else:
            status = "active" if op == "rollback" else "rolled_back"
            candidates = [rec.id for rec in reg.records(status)]
            if not candidates:  # make one (not reported: only `op` is)
                other = [rec.id for rec in reg.records("rolled_back" if op == "rollback" else "active")]
                (reg.restore if op == "rollback" else reg.rollback)(rng.choice(other))
                continue
            result = rng.choice(candidates)
            (reg.rollback if op == "rollback" else reg.restore)(result)
        out.write(event="done", op=op, result=result, seq=reg.generation, seconds=time.monotonic() - start)


def soak_writer(model, tokenizer, path: str, progress: str, stop: str, prompts: list, seed: int) -> None:
    """Edit the prompts one by one (occasionally rolling one back and restoring it) until `stop` exists."""
    out, rng = Progress(progress), random.Random(seed)
    editor = SolaEditor.open(path, model, tokenizer)
    out.write(event="start")
    for i in range(10**9):
        if os.path.exists(stop):
            break
        if i % 4 == 3:
            active = [rec.id for rec in editor.edits("active")]
            if active:
                victim = rng.choice(active)
                editor.rollback(victim)
                out.write(event="done", op="rollback", id=victim, seq=editor.registry.generation)
                editor.restore(victim)
                out.write(event="done", op="restore", id=victim, seq=editor.registry.generation)
            continue
        prompt = prompts[i % len(prompts)]
        eid = editor.edit(prompt, rng.choice(TARGETS), FIT)
        out.write(event="done", op="edit", id=eid, seq=editor.registry.generation)
    out.write(event="finished", generation=editor.registry.generation)


def soak_reader(model, tokenizer, path: str, progress: str, stop: str, prompts: list) -> None:
    """Generate for every prompt until `stop` exists, checking each row's routing against this process's
    own view of the active edits (replayed from the log); then one final round (the writer is done by then)."""
    out = Progress(progress)
    editor = SolaEditor.open(path, model, tokenizer, readonly=True)
    view = View(editor.registry)
    errors: list[str] = []
    checked = [0]  # rows whose generated text was checked against their edit's target
    editor.generate(prompts[:1], max_new_tokens=1)
    index = editor.registry.key_index  # built once; from here on new edits are only replayed into it
    out.write(event="start")
    rounds = 0
    while True:
        final = os.path.exists(stop)
        try:
            errors += check_round(editor, view, prompts, checked)
        except Exception as e:  # counted, never hidden: the test asserts there are none
            errors.append(f"{type(e).__name__}: {e}: {traceback.format_exc()}")
        rounds += 1
        if final:
            break
    out.write(event="finished", rounds=rounds, errors=errors[:10], n_errors=len(errors), seen=sorted(view.seen),
              checked_outputs=checked[0],
              routes=editor.route(prompts), generation=editor.registry.seen_generation,
              same_index=editor.registry.key_index is index)


class View:
    """The active edits as this process knows them: a snapshot at open, then every replayed log event."""

    def __init__(self, reg: EditRegistry):
        self.reg, self.seen = reg, set()
        self.generation, ids = reg.snapshot()
        self.active = ids["active"]
        self.records: dict = {}
        reg.on_change(self._apply)

    def _apply(self, event: dict) -> None:
        self.seen.update(event["activated"])
        if event["seq"] > self.generation:
            self.active = (self.active - set(event["deactivated"])) | set(event["activated"])

    def record(self, edit_id: int):
        if edit_id not in self.records:
            self.records[edit_id] = self.reg.get(edit_id)
        return self.records[edit_id]


def check_round(editor: SolaEditor, view: View, prompts: list, checked: list[int]) -> list[str]:
    """One batched generation: each row must route exactly as the view says, and produce the target."""
    outputs = editor.generate(prompts, max_new_tokens=2)
    routed = editor.routed()
    expected = {view.record(i).prompt: i for i in view.active}
    errors = []
    for prompt, edit_id, output in zip(prompts, routed, outputs):
        if edit_id != expected.get(prompt):
            errors.append(f"{prompt!r} routed to {edit_id}, but the active edit is {expected.get(prompt)}")
        elif edit_id is not None and view.record(edit_id).info.get("margin", 0) >= FIT.margin:
            target = view.record(edit_id).target
            first = editor.tokenizer.decode(editor.tokenizer(target, add_special_tokens=False)["input_ids"][:1])
            checked[0] += 1
            if not output.startswith(first):
                errors.append(f"{prompt!r} -> {output!r}, but edit {edit_id} targets {target!r}")
    return errors


def hammer(model, tokenizer, path: str, seed: int, n: int, start: str, progress: str) -> None:
    """Add n edits as fast as possible once `start` exists; every third rewrites one of three shared facts."""
    out, rng = Progress(progress), np.random.default_rng(seed)
    reg = EditRegistry.open(path)
    dim, shapes = reg.config.key_dim, adapter_shapes(reg.config)
    out.write(event="ready")
    while not os.path.exists(start):
        time.sleep(0.001)
    for i in range(n):
        fact = (i // 3) % 3 if i % 3 == 0 else None
        base = np.random.default_rng(1000 + fact).standard_normal(dim) if fact is not None else 0
        key = (base + (1e-4 if fact is not None else 1.0) * rng.standard_normal(dim)).astype(np.float32)
        adapter = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
        eid = reg.add(f"writer {seed} edit {i}", " x", key, adapter)
        out.write(event="done", id=eid, fact=fact)
        time.sleep(0.002)


JOBS = {"crash_ops": crash_ops, "soak_writer": soak_writer, "soak_reader": soak_reader, "hammer": hammer}


def zygote(model_dir: str) -> None:
    """Fork a job per request; the children never touch stdin/stdout (the parent's protocol)."""
    model, tokenizer = load_model(model_dir)
    reply = sys.stdout

    def answer(obj: dict) -> None:
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    answer({"ready": True})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    JOBS[request["job"]](model, tokenizer, **request["args"])
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            answer({"pid": pid})
        elif request["cmd"] == "wait":
            _, status = os.waitpid(request["pid"], 0)
            answer({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None})


def serve(model_dir: str, path: str) -> None:
    """A long-lived server: each request line {"prompts": [...]} is answered after one generate call."""
    model, tokenizer = load_model(model_dir)
    editor = SolaEditor.open(path, model, tokenizer, readonly=True)
    print(json.dumps({"ready": True}), flush=True)
    index = None
    for line in sys.stdin:
        request = json.loads(line)
        outputs = editor.generate(request["prompts"], max_new_tokens=request.get("max_new_tokens", 2))
        routed = editor.routed()
        logits = editor.logits(request["prompts"][:1])[0].tolist()
        if index is None:
            index = editor.registry.key_index  # the first build; later forwards only replay the log into it
        print(json.dumps({"outputs": outputs, "edits": routed, "logits": logits,
                          "generation": editor.registry.seen_generation,
                          "same_index": editor.registry.key_index is index}), flush=True)


def cli_commands(commands: str) -> None:
    """Run each argv of the JSON list through the CLI (CliRunner) in this process; print the results as JSON."""
    from click.testing import CliRunner

    from sola_core.cli import cli

    results = []
    for argv in json.loads(commands):
        result = CliRunner().invoke(cli, argv)
        results.append({"argv": argv, "exit_code": result.exit_code, "stdout": result.stdout,
                        "stderr": result.stderr, "exception": repr(result.exception)})
    print(json.dumps(results))


def nopickle(commands: str) -> None:
    """`cli` under the unpickling recorder; then a real unpickle as a canary that the recorder works."""
    import pickle
    from pathlib import PurePosixPath

    from click.testing import CliRunner

    from sola_core.cli import cli

    spy(torch, "load", "torch.load")
    spy(np, "load", "numpy.load")
    results = [{"argv": argv, "exit_code": (r := CliRunner().invoke(cli, argv)).exit_code, "output": r.output}
               for argv in json.loads(commands)]
    unpickled = list(UNPICKLED)
    pickle.loads(pickle.dumps(PurePosixPath("canary")))
    canary = [what for what, _ in UNPICKLED[len(unpickled):]]
    print(json.dumps({"results": results, "unpickled": unpickled, "canary": canary}))


if __name__ == "__main__":
    {"zygote": zygote, "serve": serve, "cli": cli_commands, "nopickle": nopickle}[sys.argv[1]](*sys.argv[2:])
