"""The server's decode loop: a batch of rows, each with its own sampling and stop strings, routed per row."""
from sola_core import EditConfig, SolaEditor, TrainConfig
from sola_core.decode import ReplyText, Sampling, decode

TRAIN = TrainConfig(lr=0.1, max_steps=300, margin=0.5)
PROMPTS = ["The capital of France is", "Hello, how are you today?", "The largest planet is"]


def run(editor, prompts, sampling, cancelled=lambda row: False):
    ids = [editor.tokenizer(p)["input_ids"] for p in prompts]
    texts, finish, tokens = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)

    def emit(ev):
        assert finish[ev.row] is None, "a row reported after its last event"
        texts[ev.row] += ev.text
        finish[ev.row], tokens[ev.row] = ev.finish, ev.tokens

    decode(editor.model, editor.tokenizer, ids, sampling, {editor.tokenizer.eos_token_id}, emit, cancelled=cancelled)
    return texts, finish, tokens


def test_greedy_batch_equals_generate_row_for_row_with_each_rows_edit(tmp_path, model, tokenizer):
    with SolaEditor.open(tmp_path / "r", model, tokenizer, config=EditConfig(key_source="layer",
                                                                             threshold=1e-4)) as editor:
        eid = editor.edit(PROMPTS[0], " Lyon", TRAIN)
        expected = [editor.generate([p], max_new_tokens=6, eos_token_id=editor.tokenizer.eos_token_id)[0] for p in PROMPTS]
        texts, finish, _ = run(editor, PROMPTS, [Sampling(max_tokens=6)] * 3)
        assert editor.routed() == [eid, None, None]
        assert texts == expected
        assert texts[0].startswith(" Lyon")
        editor.rollback(eid)
        texts, _, _ = run(editor, PROMPTS[:1], [Sampling(max_tokens=6)])
        assert editor.routed() == [None]
        assert texts[0] == editor.generate(PROMPTS[:1], max_new_tokens=6, eos_token_id=editor.tokenizer.eos_token_id)[0] != expected[0]


def test_each_row_stops_at_its_own_length_or_end_token(tmp_path, llama, tokenizer):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="layer",
                                                                             threshold=1e-4)) as editor:
        editor.edit(PROMPTS[0], " Lyon", TRAIN)  # trained with the end-of-sequence token after the target
        texts, finish, tokens = run(editor, PROMPTS, [Sampling(max_tokens=20), Sampling(max_tokens=3),
                                                      Sampling(max_tokens=5)])
        assert texts[0] == " Lyon" and finish[0] == "stop"
        assert finish[1:] == ["length", "length"] and tokens[1:] == [3, 5]
        texts, finish, tokens = run(editor, PROMPTS[:1], [Sampling(max_tokens=4, ignore_eos=True)])
        assert texts[0].startswith(" Lyon") and finish == ["length"] and tokens == [4]


def test_sampling_is_seeded_per_row_and_top_p_near_zero_is_greedy(tmp_path, llama, tokenizer):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="layer")) as editor:
        hot = [Sampling(max_tokens=8, temperature=1.5, seed=s) for s in (1, 1, 2)]
        first, _, _ = run(editor, [PROMPTS[1]] * 3, hot)
        again, _, _ = run(editor, [PROMPTS[1]] * 3, hot)
        assert first == again and first[0] == first[1] != first[2]
        greedy, _, _ = run(editor, [PROMPTS[1]], [Sampling(max_tokens=8)])
        nucleus, _, _ = run(editor, [PROMPTS[1]], [Sampling(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3)])
        assert nucleus == greedy


def test_a_cancelled_row_stops_and_the_others_go_on(tmp_path, llama, tokenizer):
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="layer")) as editor:
        full, _, _ = run(editor, PROMPTS[1:], [Sampling(max_tokens=6)] * 2)
        texts, finish, _ = run(editor, PROMPTS[1:], [Sampling(max_tokens=6)] * 2, cancelled=lambda row: row == 0)
        assert texts == ["", full[1]] and finish == [None, "length"]


class CharTokenizer:
    """Each token is one character, except 9: the first half of 'é' (decodes as U+FFFD until 10 follows)."""

    def decode(self, tokens, skip_special_tokens=True):
        text = "".join("\ufffd" if t == 9 else "é" if t == 10 else chr(t) for t in tokens)
        return text.replace("\ufffdé", "é")


def feed(reply: ReplyText, text: str) -> list[tuple[str, bool]]:
    return [reply.add(10 if c == "é" else ord(c)) for c in text]


def test_reply_text_holds_back_a_possible_stop_string_and_cuts_before_it():
    reply = ReplyText(CharTokenizer(), ("END",))
    steps = feed(reply, "abEN")
    assert "".join(t for t, _ in steps) == "ab"  # "EN" may be the start of "END"
    assert reply.add(ord("D")) == ("", True)
    reply = ReplyText(CharTokenizer(), ("END",))
    assert "".join(t for t, _ in feed(reply, "abENx")) == "abENx"  # it was not


def test_reply_text_never_sends_half_a_character():
    reply = ReplyText(CharTokenizer(), ())
    assert reply.add(ord("a")) == ("a", False)
    assert reply.add(9) == ("", False)
    assert reply.add(10) == ("é", False)
    assert reply.flush() == ""


def test_positions_match_generate_for_left_padded_rows(tmp_path, llama, tokenizer):
    """Rows of very different lengths: the short one is padded on the left and must still decode as alone."""
    with SolaEditor.open(tmp_path / "r", llama, tokenizer, config=EditConfig(key_source="layer")) as editor:
        prompts = ["Fact", "Fact number one two three four five six seven eight nine ten eleven"]
        together, _, _ = run(editor, prompts, [Sampling(max_tokens=5)] * 2)
        alone = [run(editor, [p], [Sampling(max_tokens=5)])[0][0] for p in prompts]
        assert together == alone
