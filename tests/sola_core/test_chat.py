"""Routing through a chat template: the encoder key embeds what the user asked, found from the tokenizer's own template."""
import copy

import pytest
import torch

from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.chat import ChatFrame

CHATML = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("<bos>{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
         "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
INST = ("{% for m in messages %}{% if m['role'] == 'user' %}<s>[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "inst": INST}
QUESTION = "What is the capital of France?"


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def chat(tok, *turns: str) -> str:
    roles = ["user", "assistant"] * len(turns)
    return tok.apply_chat_template([{"role": r, "content": t} for r, t in zip(roles, turns)], tokenize=False,
                                   add_generation_prompt=True)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_last_user_message_is_found_in_any_template(tokenizer, name):
    tok = with_template(tokenizer, TEMPLATES[name])
    frame = ChatFrame.of(tok)
    assert frame is not None
    assert frame.user_message(chat(tok, QUESTION)) == QUESTION
    assert frame.user_message(chat(tok, "Hello there", "Hi! How can I help?", QUESTION)) == QUESTION
    assert frame.user_message("The capital of France is") is None


def test_no_template_no_frame(tokenizer):
    assert ChatFrame.of(tokenizer) is None


def test_the_encoder_embeds_a_chat_prompt_as_its_question(tokenizer):
    from sola_core.keys import EncoderKey

    tok = with_template(tokenizer, CHATML)
    encoder = EncoderKey(tok)
    rows = [torch.tensor(tok(text)["input_ids"]) for text in (chat(tok, QUESTION), "The capital of France is")]
    assert encoder.texts(rows) == [QUESTION, "The capital of France is"]


def test_an_edit_routes_and_holds_when_asked_through_the_chat_template(tmp_path, llama, tokenizer):
    tok = with_template(tokenizer, CHATML)
    train = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
    with SolaEditor.open(tmp_path / "r", llama, tok, config=EditConfig(key_source="encoder")) as editor:
        eid = editor.edit(QUESTION, " Tokyo", train)
        other = chat(tok, "Hello, how are you today?")
        assert editor.route([chat(tok, QUESTION), other]) == [eid, None]
        replies = editor.generate([chat(tok, QUESTION), other], max_new_tokens=4)
        assert editor.routed() == [eid, None]
        editor.rollback(eid)
        assert editor.route([chat(tok, QUESTION)]) == [None]
        assert editor.generate([other], max_new_tokens=4) == replies[1:]
