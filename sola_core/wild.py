"""Edit quality the way people use a model (the WILD protocol of arXiv 2502.11177): free greedy generation,
each prompt put three ways, the reply judged as a whole.

- Styles: `bare` (the question or sentence as it is), `instruct` (after a QA instruction), `chat` (a user
  message in the model's own chat template, default system prompt included).
- A reply is the greedy continuation, up to `max_new_tokens`, cut at its first line break or sentence-ending full
  stop once leading whitespace is skipped (WILD stops on ".", "\\n" and end of sequence; a stop inside a number
  or after an initial does not end a sentence here). It holds the answer when the
  normalised answer (case, punctuation, articles, spacing: SQuAD's rule) is contained in the normalised cut
  reply; `starts` also asks that it come first.
- Locality: the whole cut reply to an unrelated prompt (`locality`), a same-relation neighbour
  (`neighbourhood_locality`), another attribute of an edited subject (`subject_locality`) or a question about an
  edited subject's other attributes and roles ("Who starred in Jaws?" beside "Jaws was directed by":
  `subject_question_locality`) is unchanged.
- Rollback fidelity: logits bit-identical to the unedited model's after rolling back a random half, per style.
- Loops: replies that repeat a phrase three times in a row ("Quito, Quito, Quito").
"""
from __future__ import annotations

import random
import re
import statistics
import string
from typing import Callable

import torch

from registry.errors import ValidationError

from .config import STYLES
from .datasets import Case
from .evaluate import Method, Report, batched, edit_all, mean

# Replies generated in one batch: one SmolLM2 step on the CPU reads all the weights whatever the rows, so 64 rows
# judge 1.8-2.9x faster than 16 (measured on 120 locality probes per style); before and after use the same batches.
JUDGE_BATCH = 64
INSTRUCTIONS = {"question": "Please answer the question:\n\nQ: {}\nA:", "completion": "Please complete the sentence:\n\n{}"}


def styled(text: str, kind: str, style: str, tokenizer) -> str:
    if style == "bare":
        return text
    if style == "instruct":
        return INSTRUCTIONS[kind].format(text)
    if style == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    raise ValidationError(f"style must be one of {', '.join(STYLES)}, got {style!r}")


def normalise(text: str) -> str:
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


SENTENCE_END = re.compile(r"\n|(?<!\b[A-Z])\.(?=\s|$)")  # a line break, or a full stop ending a sentence


def cut(reply: str) -> str:
    """The reply up to its first line break or the full stop that ends its first sentence (leading whitespace
    skipped). A stop inside a number ("24,303.04") or after an initial ("Gerald R. Ford", "F.C.") ends nothing:
    cut there, such answers could never be matched."""
    return SENTENCE_END.split(reply.lstrip(), maxsplit=1)[0].strip()


def settled(reply: str) -> bool:
    """Whether `cut` of this reply so far is already what it will be however the reply goes on: it has a line
    break, or a sentence-ending full stop with something after it (a stop at the very end may yet turn out to sit
    inside a number). Locality probes end there: their cut reply is all they are judged on."""
    text = reply.lstrip()
    end = SENTENCE_END.search(text)
    return end is not None and (end.group() == "\n" or end.end() < len(text))


def loops(reply: str) -> bool:
    """Whether some phrase of one to four words comes three times in a row."""
    words = re.findall(r"\w+", reply.lower())
    for n in range(1, 5):
        for i in range(len(words) - 3 * n + 1):
            if words[i:i + n] == words[i + n:i + 2 * n] == words[i + 2 * n:i + 3 * n]:
                return True
    return False


def evaluate_in_use(method: Method, cases: list[Case], tokenizer, *, styles=STYLES, seed: int = 0,
                    max_new_tokens: int = 40, paraphrases: bool = False, subjects: bool = False,
                    rollback: Callable[[int], object] | None = None,
                    training: Callable[[int], dict] | None = None,
                    route: Callable[[list[str]], list[int | None]] | None = None,
                    progress: Callable[[int], None] | None = None, batch_size: int = 1) -> Report:
    """Edit `cases` one by one or `batch_size` at a time (`edit_all`; each as its own prompt and " " + answer; with
    `paraphrases`, also given the case's paraphrases, which are never judged; with `subjects`, its subject), then
    judge every style.

    With `route` (which edit each prompt reaches) each style also reports how many edit prompts and rephrases
    reach their own edit, and how many locality prompts reach any: whether a miss is the routing's or the
    adapter's."""
    styles = [s for s in styles if s != "chat" or getattr(tokenizer, "chat_template", None)]  # no template, no chat

    def put(texts_kinds: list[tuple[str, str]], style: str) -> list[str]:
        return [styled(t, k, style, tokenizer) for t, k in texts_kinds]

    def replies(prompts: list[str], until=None) -> list[str]:
        return batched(lambda b: method.generate(b, max_new_tokens, until), prompts, JUDGE_BATCH)

    def cut_replies(prompts: list[str]) -> list[str]:  # what locality compares; loops are judged on whole replies
        return [cut(r) for r in replies(prompts, until=settled)]

    probes = {"neighbourhood_locality": [(p, c.kind) for c in cases for p in c.neighbours],
              "locality": [(p, c.kind) for c in cases for p in c.unrelated[:1]],
              "subject_locality": [(p, "completion") for c in cases for p in c.same_subject],
              "subject_question_locality": [(p, "question") for c in cases for p in c.subject_questions]}
    before = {(name, s): cut_replies(put(items, s)) for name, items in probes.items() for s in styles}
    half = sorted(random.Random(seed).sample(range(len(cases)), len(cases) // 2)) if rollback else []
    own = [(c.prompt, c.kind) for c in cases]
    before_logits = {s: [method.logits([p]) for p in put([own[i] for i in half], s)] for s in styles}

    edits = [{"prompt": c.prompt, "target": " " + c.answer, "form": "question" if c.kind == "question" else "completion",
              **({"paraphrases": c.paraphrases} if paraphrases else {}),
              **({"subject": c.subject} if subjects and c.subject else {})}
             for c in cases]  # the baselines take no paraphrases or subjects
    ids, seconds = edit_all(method, edits, batch_size, progress=progress)

    given = sum(len(c.paraphrases) for c in cases) if paraphrases else 0
    metrics: dict = {"edits": len(cases), "paraphrases_given": given,
                     "subjects_given": sum(bool("subject" in e) for e in edits)}
    rephrased = [(p, c.kind, c.answer) for c in cases for p in c.rephrases]
    for s in styles:
        got = replies(put(own, s))
        again = replies(put([(p, k) for p, k, _ in rephrased], s))
        metrics[f"{s}/reliability"] = mean([holds(r, c.answer) for r, c in zip(got, cases)])
        metrics[f"{s}/reliability_starts"] = mean([holds(r, c.answer, starts=True) for r, c in zip(got, cases)])
        metrics[f"{s}/generalization"] = mean([holds(r, a) for r, (_, _, a) in zip(again, rephrased)])
        metrics[f"{s}/loops"] = mean([loops(r) for r in got + again])
        if route:
            metrics.update(routing_metrics(route, cases, ids, s, tokenizer))
        for name, items in probes.items():
            if items:
                after = cut_replies(put(items, s))
                metrics[f"{s}/{name}"] = mean([a == b for a, b in zip(after, before[(name, s)])])
    if rollback:
        for i in half:
            rollback(ids[i])
        for s in styles:
            now = [method.logits([p]) for p in put([own[i] for i in half], s)]
            metrics[f"{s}/rollback_fidelity"] = mean([torch.equal(a, b) for a, b in zip(now, before_logits[s])])
    metrics["edit_seconds_median"] = statistics.median(seconds)
    metrics["edit_seconds_p95"] = sorted(seconds)[int(0.95 * (len(seconds) - 1))]
    infos = [training(i) for i in ids] if training else [{} for _ in ids]
    if infos and "steps" in infos[0]:
        metrics["edits_stopped_short"] = sum(bool(info.get("stopped_short")) for info in infos)
        metrics["edit_steps_median"] = statistics.median(info.get("steps", 0) for info in infos)
    edits = [{"id": i, "prompt": c.prompt, "answer": c.answer, "seconds": round(t, 4),
              **{k: info[k] for k in ("steps", "stopped_short") if k in info}}
             for i, c, t, info in zip(ids, cases, seconds, infos)]
    return Report(metrics, edits)


def routing_metrics(route: Callable[[list[str]], list[int | None]], cases: list[Case], ids: list[int], style: str,
                    tokenizer) -> dict:
    """In one style: the share of edit prompts and of rephrases that reach their own edit (`ids`, one per case),
    and of locality prompts (unrelated and neighbouring) that reach any edit; where the cases have them, also of
    prompts and questions about another attribute of an edited subject."""
    def put(items: list[tuple[str, str]]) -> list[str]:
        return [styled(text, kind, style, tokenizer) for text, kind in items]

    own = [(c.prompt, c.kind) for c in cases]
    rephrased = [(p, c.kind) for c in cases for p in c.rephrases]
    owners = [i for i, c in zip(ids, cases) for _ in c.rephrases]
    outsiders = [(p, c.kind) for c in cases for p in c.unrelated[:1] + c.neighbours]
    same = [(p, "completion") for c in cases for p in c.same_subject]
    asked = [(p, "question") for c in cases for p in c.subject_questions]
    metrics = {f"{style}/routed": mean([r == i for r, i in zip(batched(route, put(own)), ids)]),
               f"{style}/rephrases_routed": mean([r == i for r, i in zip(batched(route, put(rephrased)), owners)]),
               f"{style}/false_routes": mean([r is not None for r in batched(route, put(outsiders))])}
    if same:
        metrics[f"{style}/subject_false_routes"] = mean([r is not None for r in batched(route, put(same))])
    if asked:
        metrics[f"{style}/subject_question_false_routes"] = mean([r is not None for r in batched(route, put(asked))])
    return metrics


def holds(reply: str, answer: str, starts: bool = False) -> bool:
    got, want = normalise(cut(reply)), normalise(answer)
    return bool(want) and (got.startswith(want) if starts else want in got)


def evaluate_sola_in_use(model, tokenizer, cases: list[Case], path: str, config=None, train=None, seed: int = 0,
                         styles=STYLES, max_new_tokens: int = 40, paraphrases: bool = False, subjects: bool = False,
                         progress: Callable[[int], None] | None = None, batch_size: int = 1) -> Report:
    """The in-use harness on SolaEditor with a new registry at `path` (the model is unpatched afterwards)."""
    from .config import TrainConfig
    from .editor import SolaEditor
    from .evaluate import SolaMethod

    train = train or TrainConfig()
    with SolaEditor.open(path, model, tokenizer, config=config) as editor:
        return evaluate_in_use(SolaMethod(editor, train), cases, tokenizer, styles=styles, seed=seed,
                               max_new_tokens=max_new_tokens, paraphrases=paraphrases, subjects=subjects,
                               rollback=editor.rollback,
                               training=lambda edit_id: editor.registry.get(edit_id).info,
                               route=editor.route, progress=progress, batch_size=batch_size)
