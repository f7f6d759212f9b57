"""`sola serve` end to end: the real server in its own process, talked to with the official `openai` client and
plain HTTP; edits made by another process (the CLI) take effect on the next request."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.serve.conftest import FRANCE, JAPAN, TOKEN, TRAIN, Served, sola

OTHER = "Hello, how are you today?"


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def complete(server, prompt, **kw) -> dict:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0, **kw}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_models_and_health(server):
    assert [m.id for m in client(server).models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completions_with_the_openai_client_give_what_sola_generate_gives(server):
    expected = sola(server.registry, server.model, "generate", FRANCE, OTHER, "--max-new-tokens", "6")
    raw = client(server).completions.with_raw_response.create(model="tiny", prompt=[FRANCE, OTHER], max_tokens=6,
                                                              temperature=0)
    reply = raw.parse()
    assert [c.text for c in reply.choices] == [row["output"] for row in expected]
    assert [c.model_extra["sola_edit"] for c in reply.choices] == [server.france, None] == [r["edit"] for r in expected]
    assert raw.headers["x-sola-edit"] == f"{server.france},none"
    assert reply.choices[0].text.startswith(" Lyon")
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + \
        reply.usage.completion_tokens


def test_chat_goes_through_the_template_and_routes_to_the_chat_edit(server):
    reply = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": JAPAN}],
                                                   temperature=0, max_tokens=8)
    choice = reply.choices[0]
    templated = AutoTokenizer.from_pretrained(server.model).apply_chat_template(
        [{"role": "user", "content": JAPAN}], tokenize=False, add_generation_prompt=True)
    expected = sola(server.registry, server.model, "generate", templated, "--max-new-tokens", "8")[0]
    assert choice.model_extra["sola_edit"] == server.japan == expected["edit"]
    assert choice.message.role == "assistant" and choice.message.content == expected["output"]
    other = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": OTHER}],
                                                   temperature=0, max_tokens=4)
    assert other.choices[0].model_extra["sola_edit"] is None


def test_streaming_gives_the_same_text_as_one_reply(server):
    c = client(server)
    whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": JAPAN}], temperature=0,
                                      max_tokens=8)
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": JAPAN}],
                                            temperature=0, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.choices[0].model_extra["sola_edit"] == server.japan for ch in chunks if ch.choices)
    parts = list(c.completions.create(model="tiny", prompt=OTHER, max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == complete(server, OTHER)["choices"][0]["text"]


def test_sampling_n_seed_and_stop(server):
    first = complete(server, OTHER, n=3, temperature=1.2, seed=7, max_tokens=8)
    again = complete(server, OTHER, n=3, temperature=1.2, seed=7, max_tokens=8)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    greedy = complete(server, OTHER, max_tokens=8)["choices"][0]["text"]
    stop = greedy[2:4]
    cut = complete(server, OTHER, max_tokens=8, stop=[stop])["choices"][0]
    assert cut["text"] == greedy[:greedy.index(stop)] and cut["finish_reason"] == "stop"


def test_the_openai_client_gets_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="gpt-4", prompt=FRANCE)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=FRANCE, max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "temperature": "hot"}), "temperature"),
    (json.dumps({"model": "tiny", "prompt": 12}), "prompt"),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "n": 100}), "n"),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "logprobs": 2}), "logprobs"),
    (json.dumps({"model": "tiny", "prompt": FRANCE, "logit_bias": {"5": 100}}), "logit_bias"),
    (json.dumps({"model": "tiny", "prompt": "Fact " * 200}), None),
    (json.dumps({"model": "tiny", "messages": []}), "messages"),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}), "messages"),
])
def test_bad_requests_get_a_4xx_json_error_and_no_traceback(server, body, param):
    path = "/v1/chat/completions" if b"messages" in (body if isinstance(body, bytes) else body.encode()) \
        else "/v1/completions"
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param
    assert "Traceback" not in r.text


def test_unknown_paths_and_methods_are_json_errors(server):
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_an_edit_made_with_the_cli_serves_the_next_request(server):
    prompt = "The largest planet is"
    before = complete(server, prompt)["choices"][0]
    assert before["sola_edit"] is None
    new = sola(server.registry, server.model, "edit", "--prompt", prompt, "--target", " Saturn", *TRAIN)[0]["id"]
    after = complete(server, prompt)["choices"][0]
    assert after["sola_edit"] == new and after["text"].startswith(" Saturn")
    sola(server.registry, server.model, "rollback", str(new))
    back = complete(server, prompt)["choices"][0]
    assert back == before


def test_admin_endpoints_need_the_token(server):
    url = server.url + "/admin/edits"
    body = {"prompt": "Water boils at", "target": " Rome"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, json={"prompt": "x"}, headers=auth).status_code == 400
    assert httpx.post(url, json={**body, "form": "poem"}, headers=auth).status_code == 400
    r = httpx.post(url + "/9999/rollback", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "edit_not_found"
    record = httpx.post(url, json=body, headers=auth, timeout=120).json()
    assert record["status"] == "active" and complete(server, "Water boils at")["choices"][0]["sola_edit"] == record["id"]
    assert httpx.post(url + f"/{record['id']}/rollback", headers=auth).json()["status"] == "rolled_back"
    assert complete(server, "Water boils at")["choices"][0]["sola_edit"] is None
    again = httpx.post(url + f"/{record['id']}/rollback", headers=auth)
    assert again.status_code == 400 and "already rolled back" in again.json()["error"]["message"]


def test_admin_is_off_without_a_token(served_registry, tmp_path):
    s = Served(served_registry["path"], served_registry["model"], tmp_path / "serve.log")
    try:
        r = httpx.post(s.url + "/admin/edits", json={"prompt": "a", "target": "b"},
                       headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 404
        assert complete(s, FRANCE)["choices"][0]["sola_edit"] == served_registry["france"]
    finally:
        s.stop()
