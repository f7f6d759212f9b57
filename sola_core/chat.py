"""What a user asked, read out of a conversation formatted with the model's own chat template.

A sentence encoder that embeds a whole templated prompt embeds mostly the template (system prompt, role markers),
so every chat question lands near every other and far from its fact's key. The template's wrapping is learnt from
the tokenizer itself, by rendering conversations made of sentinel messages and reading what surrounds them: no
list of known templates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

SENTINELS = ("SOLAFIRSTUSERMESSAGE", "SOLAASSISTANTMESSAGE", "SOLASECONDUSERMESSAGE")


@dataclass(frozen=True)
class ChatFrame:
    """The text before a user message (`opener`) and after the last one up to the reply (`closer`)."""

    opener: str
    closer: str

    @classmethod
    def of(cls, tokenizer) -> "ChatFrame | None":
        """The frame of `tokenizer`'s chat template, or None when it has none (or one this cannot read)."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        first, reply, second = SENTINELS
        try:
            one = render(tokenizer, [{"role": "user", "content": first}])
        except Exception:  # templates are arbitrary Jinja: one that cannot render a plain user turn gives no frame
            return None
        if one.count(first) != 1:
            return None
        before, closer = one.split(first)
        try:
            two = render(tokenizer, [{"role": "user", "content": first}, {"role": "assistant", "content": reply},
                                     {"role": "user", "content": second}])
            between = two.split(reply, 1)[1].split(second, 1)[0]  # end of a reply, start of a user turn
            opener = os.path.commonprefix([before[::-1], between[::-1]])[::-1]
        except Exception:  # a single-turn template: the first user turn's opener is all there is
            opener = before
        if not opener or not closer:
            return None
        return cls(opener, closer)

    def user_message(self, text: str) -> str | None:
        """The last user message of `text` when it is a templated conversation awaiting the reply, else None."""
        if not text.endswith(self.closer):
            return None
        body = text[:-len(self.closer)]
        start = body.rfind(self.opener)
        return body[start + len(self.opener):].strip() if start >= 0 else None


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer, user: str) -> str:
    """A single user turn in `tokenizer`'s chat template (its default system prompt included), awaiting the reply."""
    return render(tokenizer, [{"role": "user", "content": user}])


def chat_reply(tokenizer, user: str, answer: str) -> str | None:
    """How the template writes the assistant's `answer` after `chat_prompt(user)`, end-of-turn marker included;
    None when the template does not render the conversation as that prompt followed by the reply."""
    prompt = chat_prompt(tokenizer, user)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    if not full.startswith(prompt) or answer not in full[len(prompt):]:
        return None
    reply = full[len(prompt):]
    return reply.rstrip("\n") if reply.strip() else None
