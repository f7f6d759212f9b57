"""The edit-quality harness: N sequential edits on a model, then every metric the issue tracker asks for.

Any editing method that can `edit`, `generate` (greedy, batched) and report next-token `logits` can be measured;
SolaEditor is one, the baselines in bench/baselines/ are others. Comparisons that must be exact (locality,
rollback fidelity) run the same prompts in the same batches before and after, so batching cannot explain a
difference.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .facts import UNRELATED, Fact

BATCH = 16
PROBE_TOKENS = 5  # greedy tokens compared for locality and neighbourhood locality


class Method(Protocol):
    # form: how the prompt is asked (SolaEditor.edit's; a method may train every form alike). Methods that can
    # also have edit_many(edits) -> ids.
    def edit(self, prompt: str, target: str, form: str = "completion") -> int: ...
    # until(text): a row may end once it holds for its reply so far (the harness has what it judges)
    def generate(self, prompts: list[str], max_new_tokens: int,
                 until: Callable[[str], bool] | None = None) -> list[str]: ...
    def logits(self, prompts: list[str]) -> torch.Tensor: ...


@dataclass
class Report:
    metrics: dict
    edits: list[dict]

    def markdown(self, name: str = "SoLA") -> str:
        rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in self.metrics.items()]
        return "\n".join([f"| metric | {name} |", "|---|---|", *rows])


def batched(fn: Callable[[list[str]], list], prompts: list[str], size: int = BATCH) -> list:
    out = []
    for i in range(0, len(prompts), size):
        out.extend(fn(prompts[i:i + size]))
    return out


def edit_all(method: Method, edits: list[dict], batch_size: int = 1,
             after: Callable[[list[int], list[dict]], None] | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[list[int], list[float]]:
    """Make `edits` (keyword arguments of `method.edit`): one by one, or with `batch_size` > 1 that many at a time
    through `method.edit_many`. Returns the ids and each edit's seconds (a batch's time shared by its edits);
    `after(ids, edits)` runs after each edit or batch."""
    ids, seconds = [], []
    for i in range(0, len(edits), batch_size):
        group = edits[i:i + batch_size]
        start = time.perf_counter()
        new = method.edit_many(group) if batch_size > 1 else [method.edit(**group[0])]
        seconds += [(time.perf_counter() - start) / len(group)] * len(group)
        ids += new
        if after:
            after(new, group)
        if progress:
            progress(len(group))
    return ids, seconds


def starts(method: Method, prompts: list[str], targets: list[str], n_tokens: int) -> list[bool]:
    """Does the greedy continuation of each prompt start with its target?"""
    outputs = batched(lambda ps: method.generate(ps, n_tokens), prompts)
    return [o.startswith(t) for o, t in zip(outputs, targets)]


def evaluate(method: Method, facts: list[Fact], *, target_tokens: Callable[[str], int], seed: int = 0,
             rollback: Callable[[int], object] | None = None, stats: Callable[[], dict] | None = None,
             progress: Callable[[int], None] | None = None,
             route: Callable[[list[str]], list[int | None]] | None = None, batch_size: int = 1) -> Report:
    """Edit `facts` one by one (or `batch_size` at a time, `edit_all`), then measure; `target_tokens(text)` counts
    a target's tokens. Edit success is judged right after each edit (or its batch).

    With `route` (which edit each prompt reaches), rollback fidelity is also split by whether a rolled-back
    prompt still reaches another, neighbouring edit: those can differ from the unedited model by routing
    alone, while the unrouted ones show whether rollback itself is exact.
    """
    n_tok = max(target_tokens(f.target) for f in facts)
    neighbours = [p for f in facts for p in f.neighbours]
    probe = lambda ps: batched(lambda b: method.generate(b, PROBE_TOKENS), ps)  # noqa: E731
    before_neighbours, before_unrelated = probe(neighbours), probe(UNRELATED)
    half = set(random.Random(seed).sample(range(len(facts)), len(facts) // 2)) if rollback else set()
    before_logits = {i: method.logits([facts[i].prompt]) for i in sorted(half)}

    success: list[bool] = []
    ids, seconds = edit_all(method, [{"prompt": f.prompt, "target": f.target} for f in facts], batch_size,
                            after=lambda _, group: success.extend(starts(method, [e["prompt"] for e in group],
                                                                         [e["target"] for e in group], n_tok)),
                            progress=progress)

    retained = starts(method, [f.prompt for f in facts], [f.target for f in facts], n_tok)
    paraphrases = [(p, f.target) for f in facts for p in f.paraphrases]
    general = starts(method, [p for p, _ in paraphrases], [t for _, t in paraphrases], n_tok)
    metrics = {
        "edits": len(facts),
        "edit_success": mean(success),
        "retention": mean(retained),
        "generalization": mean(general),
        "locality": mean([a == b for a, b in zip(probe(UNRELATED), before_unrelated)]),
        "neighbourhood_locality": mean([a == b for a, b in zip(probe(neighbours), before_neighbours)]),
        "edit_seconds_median": statistics.median(seconds),
        "edit_seconds_p95": sorted(seconds)[int(0.95 * (len(seconds) - 1))],
    }
    if rollback:
        for i in sorted(half):
            rollback(ids[i])
        identical = [torch.equal(method.logits([facts[i].prompt]), before_logits[i]) for i in sorted(half)]
        kept = [i for i in range(len(facts)) if i not in half]
        still = starts(method, [facts[i].prompt for i in kept], [facts[i].target for i in kept], n_tok)
        metrics["rollback_fidelity"] = mean(identical)
        if route:
            rerouted = [r is not None for r in batched(route, [facts[i].prompt for i in sorted(half)])]
            metrics["rolled_back_routed_elsewhere"] = mean(rerouted)
            metrics["rollback_fidelity_unrouted"] = mean([same for same, r in zip(identical, rerouted) if not r])
        metrics["retention_after_rollback"] = mean(still)
    metrics.update(stats() if stats else {})
    edits = [{"id": i, "relation": f.relation, "prompt": f.prompt, "target": f.target, "success": s,
              "retained": r, "seconds": round(t, 4)} for i, f, s, r, t in zip(ids, facts, success, retained, seconds)]
    return Report(metrics, edits)


def mean(values: list[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def evaluate_sola(model, tokenizer, facts: list[Fact], path: str, config=None, train=None, seed: int = 0,
                  progress: Callable[[int], None] | None = None, batch_size: int = 1) -> Report:
    """The harness on SolaEditor with a new registry at `path` (the model is unpatched afterwards)."""
    from .editor import SolaEditor

    with SolaEditor.open(path, model, tokenizer, config=config) as editor:
        cfg = editor.registry.config

        def stats() -> dict:
            return {"key_source": cfg.key_source, "threshold": cfg.threshold, "rank": cfg.rank,
                    "layers": [spec.name for spec in cfg.layers],
                    "adapter_bytes_per_edit": editor.registry.stats()["adapter_bytes"],
                    "trainable_params_per_edit": sum(cfg.rank * (s.in_features + s.out_features) for s in cfg.layers)}

        return evaluate(
            SolaMethod(editor, train), facts, seed=seed, rollback=editor.rollback, route=editor.route, stats=stats,
            progress=progress, batch_size=batch_size,
            target_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        )


class SolaMethod:
    """SolaEditor seen through the harness's Method protocol (training settings bound)."""

    def __init__(self, editor, train) -> None:
        self.editor, self.train = editor, train

    def edit(self, prompt: str, target: str, form: str = "completion", paraphrases: list[str] = (),
             subject: str | None = None) -> int:
        return self.editor.edit(prompt, target, self.train, form=form, paraphrases=paraphrases, subject=subject)

    def edit_many(self, edits: list[dict]) -> list[int]:
        return self.editor.edit_many(edits, self.train, batch_size=len(edits))

    def generate(self, prompts: list[str], max_new_tokens: int, until=None) -> list[str]:
        return self.editor.generate(prompts, max_new_tokens, until=until)

    def logits(self, prompts: list[str]) -> torch.Tensor:
        return self.editor.logits(prompts)
