"""`sola demo`: the main job on the embedded model, start to finish in a temporary registry."""
from __future__ import annotations

import tempfile
import time
from typing import Callable

import torch

from .config import NAMED_RADIUS
from .editor import SolaEditor
from .models import load_model

EDITS = [
    ("The capital of France is", " Lyon"),
    ("The largest planet in the solar system is", " Saturn"),
    ("The Mona Lisa was painted by", " Pablo Picasso"),
]
PARAPHRASE = "The capital city of France is"  # a rewording of the first edit
NEIGHBOUR = "The capital of Germany is"  # same relation, other subject: must keep its answer
UNRELATED = "The chemical symbol for gold is"
CHAT_QUESTION = "What is the capital of France?"  # asked through the model's chat template


def run_demo(model_name: str | None = None, echo: Callable[[str], None] | None = print, max_new_tokens: int = 6) -> dict:
    """Edit, serve, probe and roll back; returns everything shown, with timings, as a dict."""
    say = echo or (lambda _: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model, tokenizer = load_model(model_name)
    timings["load_model_s"] = time.perf_counter() - start
    prompts = [p for p, _ in EDITS] + [PARAPHRASE, NEIGHBOUR, UNRELATED]
    shown = list(prompts)  # how each prompt is printed
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(chat)
        shown.append(f"[chat template] {CHAT_QUESTION} ->")
    with tempfile.TemporaryDirectory() as tmp, SolaEditor.open(f"{tmp}/registry", model, tokenizer) as editor:
        say(f"model {model_name or 'smollm2'} loaded in {timings['load_model_s']:.1f} s; "
            f"editing {editor.registry.config.layers[0].name}")
        before = editor.generate(prompts, max_new_tokens)
        logits_before = editor.logits([EDITS[0][0]])
        say("\nBefore editing:")
        for p, out in zip(shown, before):
            say(f"  {p}{out!r}")

        ids, edit_seconds = [], []
        for prompt, target in EDITS:
            t0 = time.perf_counter()
            ids.append(editor.edit(prompt, target))
            edit_seconds.append(time.perf_counter() - t0)
            say(f"edit {ids[-1]}: {prompt!r} -> {target!r} in {edit_seconds[-1]:.2f} s")
        timings["edit_s"] = edit_seconds

        t0 = time.perf_counter()
        after = editor.generate(prompts, max_new_tokens)  # one mixed batch: edited and unedited rows
        timings["generate_batch_s"] = time.perf_counter() - t0
        routes = editor.route(prompts)
        say("\nAfter editing (one batch; [edit id] that fired):")
        for p, out, r in zip(shown, after, routes):
            say(f"  [{'-' if r is None else r}] {p}{out!r}")

        threshold = editor.registry.config.threshold
        distances = {}
        probes = [("paraphrase", PARAPHRASE, PARAPHRASE), ("neighbour", NEIGHBOUR, NEIGHBOUR)]
        if chat is not None:
            probes.append(("chat question", chat, CHAT_QUESTION))
        for label, prompt, text in probes:
            dist, nearest = editor.registry.nearest(editor.key(prompt)[None])
            distances[label] = d = float(dist[0])
            routed = editor.route([prompt])[0] is not None
            why = (f"within the threshold {threshold}" + ("" if routed else ", but naming another subject")
                   if d <= threshold else
                   f"beyond the threshold {threshold}, " + ("within" if d <= NAMED_RADIUS else "beyond") +
                   f" {NAMED_RADIUS}" + (", naming what the edit names and asking what it asks" if routed else ""))
            say(f"{label} {text!r}: nearest edit {int(nearest[0])} at key distance {d:.3f} "
                f"({'routes' if routed else 'does not route'}: {why})")

        editor.rollback(ids[0])
        rolled = editor.generate([EDITS[0][0]], max_new_tokens)[0]
        identical = torch.equal(logits_before, editor.logits([EDITS[0][0]]))
        say(f"\nRolled back edit {ids[0]}: {EDITS[0][0]}{rolled!r} "
            f"(logits bit-identical to before the edit: {identical})")
    timings["total_s"] = time.perf_counter() - start
    say(f"\nmedian edit {sorted(edit_seconds)[len(edit_seconds) // 2]:.2f} s; total {timings['total_s']:.1f} s")
    return {"prompts": prompts, "before": before, "after": after, "routes": routes, "edit_ids": ids, "key_distances": distances,
            "after_rollback": rolled, "rollback_bit_identical": identical, "timings": timings}
