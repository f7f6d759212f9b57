"""What one edit is (a prompt, its target, how it is asked, other phrasings, what it is about) and whether a model
can take it.

Both checks run before anything is trained or written, so a refused edit (or a refused line of a file of edits)
leaves the registry as it was: `normal_edit` needs nothing but the edit, `check_edit` needs the model's tokenizer
and context. Text itself follows the registry's one rule (`registry.types.check_edit_text`).
"""
from __future__ import annotations

from torch import nn

from registry.codec import MAX_KEYS
from registry.errors import ValidationError
from registry.types import check_edit_text

from .chat import chat_prompt
from .config import FORMS
from .generation import context_length
from .keys import words


def normal_edit(edit: dict) -> dict:
    """An edit (a dict of `SolaEditor.edit`'s arguments) checked, with its defaults and its phrasings: the prompt
    first, then its distinct paraphrases. Refused (ValidationError, one line): a missing or unknown field, text
    that is empty, blank or not valid Unicode, an unknown form, too many paraphrases, a subject whose words the
    prompt does not say (a typo would quietly route nothing by it)."""
    try:
        e = {"form": "completion", "paraphrases": (), "subject": None, **edit}
        prompt, target, form = e.pop("prompt"), e.pop("target"), e.pop("form")
        paraphrases, subject = e.pop("paraphrases"), e.pop("subject")
    except (KeyError, TypeError):
        raise ValidationError(f"an edit is a dict with prompt, target and optional form, paraphrases and subject; "
                              f"got {edit!r:.80}") from None
    if e:
        raise ValidationError(f"unknown edit field {sorted(e)[0]!r}: an edit has prompt, target, form, paraphrases, "
                              f"subject")
    paraphrases = check_edit_text(prompt, target, paraphrases, subject)
    if form not in FORMS:
        raise ValidationError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if subject is not None and not words(subject) <= words(prompt):
        raise ValidationError(f"subject {subject!r} is not in the prompt {prompt!r}: give the words it is named by there")
    phrasings = list(dict.fromkeys([prompt, *paraphrases]))  # repeats add nothing
    if len(phrasings) > MAX_KEYS:
        raise ValidationError(f"an edit holds at most {MAX_KEYS - 1} paraphrases, got {len(phrasings) - 1}")
    return {"prompt": prompt, "target": target, "form": form, "phrasings": phrasings, "subject": subject}


def check_edit(model: nn.Module, tokenizer, edit: dict) -> None:
    """Refuse (ValidationError, one line) a `normal_edit` this model cannot take: a chat edit for a tokenizer
    without a chat template, or a phrasing + target longer than the model's context."""
    form, phrasings = edit["form"], edit["phrasings"]
    if form == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValidationError("a chat edit needs a tokenizer with a chat template; this one has none")
    limit = context_length(model)
    if not limit:
        return
    answer = len(tokenizer(edit["target"], add_special_tokens=False)["input_ids"])
    for name, text in zip(["prompt", *["paraphrase"] * (len(phrasings) - 1)], phrasings):
        n = len(tokenizer(chat_prompt(tokenizer, text) if form == "chat" else text)["input_ids"]) + answer
        if n > limit:
            raise ValidationError(f"{name} and target are {n} tokens; the model's context is {limit}")
