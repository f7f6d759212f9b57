"""Routing through real `generate` calls, on whichever transformers release is installed.

Each way of generating must route a sequence once, on its prompt pass, and keep that edit for every new token:
edited rows produce their whole multi-token target, unedited rows produce exactly what the unedited model does.
A failure here names the installed transformers release, since a new release is what breaks these first.
"""
import copy
import inspect

import pytest
import torch
import transformers

from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.generation import with_positions
from sola_core.routing import Prompt, cache_length, cached_tokens

TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
EDITED, TARGET = "The capital of France is", " Tokyo Rome"  # four tokens: a decision lost after the first shows
UNRELATED = ["Hello, how are you today?", "Water boils at"]
RELEASE = f"on transformers {transformers.__version__}"
CONFIGS = {"layer": EditConfig(key_source="layer", threshold=1e-4), "encoder": EditConfig(key_source="encoder")}


@pytest.fixture(params=["layer", "encoder"])
def setup(request, tmp_path, model, tokenizer):
    """(editor, unedited copy of the model, edit id)."""
    base = copy.deepcopy(model)
    editor = SolaEditor.open(tmp_path / "r", model, tokenizer, config=CONFIGS[request.param])
    eid = editor.edit(EDITED, TARGET, TRAIN)
    yield editor, base, eid
    editor.close()


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def generate(model, tokenizer, prompts, **kwargs):
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
    kwargs = {"max_new_tokens": n_tokens(tokenizer, TARGET), "pad_token_id": tokenizer.pad_token_id,
              "do_sample": False, **kwargs}
    with torch.no_grad():
        out = model.generate(**enc, **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


GENERATIONS = {
    "greedy": {},
    "no_cache": {"use_cache": False},
    "sampling": {"do_sample": True, "temperature": 0.01},
    "beam_search": {"num_beams": 3},
    "return_sequences": {"num_beams": 2, "num_return_sequences": 2},
}


@pytest.mark.parametrize("how", list(GENERATIONS))
def test_each_way_of_generating_keeps_the_prompts_edit_for_every_token(setup, tokenizer, how):
    editor, base, eid = setup
    kwargs = GENERATIONS[how]
    k = kwargs.get("num_return_sequences", 1)
    prompts = [UNRELATED[0], EDITED, UNRELATED[1]]  # different lengths: a left-padded batch
    torch.manual_seed(0)
    out = generate(editor.model, tokenizer, prompts, **kwargs)
    routed = editor.routed()
    torch.manual_seed(0)
    expected = generate(base, tokenizer, prompts, **kwargs)
    e = len(routed) // len(prompts)  # generate's rows per prompt: beams, or returned sequences
    assert routed == [None] * e + [eid] * e + [None] * e, f"{how} routed {routed} {RELEASE}"
    assert out[k] == TARGET, f"{how}: the edited prompt gave {out[k]!r}, not {TARGET!r} {RELEASE}"
    unedited = [out[:k], out[2 * k:]]
    assert unedited == [expected[:k], expected[2 * k:]], f"{how} changed unedited rows {RELEASE}"


def test_a_new_generate_call_is_routed_afresh(setup, tokenizer):
    editor, base, eid = setup
    assert generate(editor.model, tokenizer, [EDITED])[0] == TARGET
    assert generate(editor.model, tokenizer, [UNRELATED[0]]) == generate(base, tokenizer, [UNRELATED[0]]), RELEASE
    assert editor.routed() == [None], RELEASE


def test_an_edited_row_never_ends_its_reply_before_its_answer_begins(setup, tokenizer):
    """On a model whose every reply would end at once, the edited row still gives its answer's first token, then
    ends (the decode steps are left alone); the unedited row ends at once, as the unedited model does."""
    editor, base, eid = setup
    eos = tokenizer.eos_token_id

    def ends_at_once(head, args, logits):
        logits[..., eos] += 1e4

    hooks = [m.get_output_embeddings().register_forward_hook(ends_at_once) for m in (editor.model, base)]
    try:
        prompts = [UNRELATED[0], EDITED]  # the edited row left-padded
        out = generate(editor.model, tokenizer, prompts)
        assert editor.routed() == [None, eid], RELEASE
        first = tokenizer.decode(tokenizer(TARGET, add_special_tokens=False)["input_ids"][:1])
        assert out == ["", first], f"{out} {RELEASE}"
        assert generate(base, tokenizer, prompts) == ["", ""], RELEASE
        enc = with_positions(base, editor.tokenize_batch(prompts))
        with torch.no_grad():  # a plain forward is a prompt pass too: every position's logits, the last one's ruled
            logits, expected = editor.model(**enc).logits, base(**enc).logits
        assert editor.routed() == [None, eid], RELEASE
        assert logits[1, -1, eos] == float("-inf") and logits[1, :-1, eos].isfinite().all(), RELEASE
        assert torch.equal(logits[0], expected[0]), f"the unedited row changed {RELEASE}"
    finally:
        for hook in hooks:
            hook.remove()


def cache_of(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_keyword(model) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_continuing_a_conversation_with_its_cache_routes_the_new_turn(setup, tokenizer):
    """Turn two, given with the cache of turn one, is routed by its own tokens; unrouted, it is computed exactly as
    the unedited model computes it on top of the same cache."""
    editor, base, eid = setup
    first = tokenizer([UNRELATED[0]], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cache = cache_of(editor.model(input_ids=first, use_cache=True))
    assert editor.routed() == [None], RELEASE
    text = UNRELATED[1] if editor.router.keys.name == "layer" else EDITED
    ids = torch.cat([first, tokenizer([text], return_tensors="pt", add_special_tokens=False)["input_ids"]], dim=1)
    kwargs = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
              "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        served = editor.model.generate(ids, **kwargs, **{cache_keyword(editor.model): copy.deepcopy(cache)})
        if editor.router.keys.name == "layer":  # the history's states move the query far from any key
            assert editor.routed() == [None], RELEASE
            expected = base.generate(ids, **kwargs, **{cache_keyword(base): copy.deepcopy(cache)})
            assert torch.equal(served, expected), f"turn two changed {RELEASE}"
        else:  # the encoder key reads the new turn's text, which is the edited prompt
            assert editor.routed() == [eid], f"turn two routed {editor.routed()} {RELEASE}"


def test_a_hand_written_decode_loop_keeps_the_decision(setup, tokenizer):
    editor, base, eid = setup
    ids = tokenizer([EDITED], return_tensors="pt")["input_ids"]
    mask, cache, new = torch.ones_like(ids), None, []
    with torch.no_grad():
        for _ in range(n_tokens(tokenizer, TARGET)):
            kwargs = {cache_keyword(editor.model): cache} if cache is not None else {}
            out = editor.model(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
            cache = cache_of(out)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            new.append(ids)
            assert editor.routed() == [eid], RELEASE
    assert tokenizer.decode(torch.cat(new, 1)[0]) == TARGET, RELEASE


def test_cached_tokens_are_counted_whatever_the_keyword():
    layer = (torch.zeros(2, 4, 7, 8), torch.zeros(2, 4, 7, 8))  # legacy (key, value): (B, heads, T, head_dim)
    assert cache_length((layer, layer)) == 7 and cache_length(None) == 0 and cache_length(torch.ones(3)) == 0
    assert cached_tokens({"some_new_name": (layer,)}, 1, None) == 7
    assert cached_tokens({}, 1, torch.ones(2, 9)) == 8  # the mask covers the cached tokens too
    assert cached_tokens({}, 9, torch.ones(2, 9)) == 0


def test_last_positions_with_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    prompt = Prompt(None, mask, rows=3, length=4, cached=0, device=torch.device("cpu"))
    assert prompt.last_positions().tolist() == [3, 2, 3]
    assert Prompt(None, None, 2, 5, 0, torch.device("cpu")).last_positions().tolist() == [4, 4]


def test_routing_with_the_encoder_key_runs_no_language_model(tmp_path, llama, tokenizer):
    calls = []
    llama.register_forward_pre_hook(lambda *a: calls.append(1))
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=CONFIGS["encoder"]) as editor:
        eid = editor.edit(EDITED, TARGET, TRAIN)
        trained = len(calls)
        # the training passes, and no other: one to record the blocks below the edited one, then steps + 1
        assert trained == editor.registry.get(eid).info["steps"] + 2
        assert editor.route([EDITED, UNRELATED[0]]) == [eid, None]
        assert torch.allclose(editor.key(EDITED), editor.router.keys.embed([EDITED])[0], atol=1e-6)
        assert len(calls) == trained


def test_routing_with_the_layer_key_stops_at_the_first_edited_layer(tmp_path, llama, tokenizer):
    head = []
    llama.lm_head.register_forward_pre_hook(lambda *a: head.append(1))
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=CONFIGS["layer"]) as editor:
        eid = editor.edit(EDITED, TARGET, TRAIN)
        trained = len(head)
        assert editor.route([EDITED, UNRELATED[0]]) == [eid, None]
        assert editor.key(EDITED).shape == (editor.registry.config.key_dim,)
        assert len(head) == trained
