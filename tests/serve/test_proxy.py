"""`sola serve --upstream`: the router in front, two real `sola serve --by-name` engines behind it, all on one
registry and each in its own process; edits and rollbacks made through the CLI (a fourth process)."""
from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from registry import EditRegistry
from registry.peft_format import adapter_name
from sola_core.launch import free_port
from sola_core.proxy import forwarded
from tests.serve.conftest import FRANCE, JAPAN, TRAIN, Served, sola
from tests.sola_core.test_peft_export import vllm_problems

OTHER = "Hello, how are you today?"


@pytest.fixture(scope="module")
def cluster(served_registry, tmp_path_factory):
    """Two engines serving edits by name and a router over them, on one copy of the served registry."""
    import shutil

    work = tmp_path_factory.mktemp("cluster")
    path = str(work / "reg")
    shutil.copytree(served_registry["path"], path)
    model = served_registry["model"]
    engines = [Served(path, model, work / f"engine{i}.log", "--by-name") for i in range(2)]
    try:
        router = Served(path, model, work / "router.log", *(a for e in engines for a in ("--upstream", e.url)))
    except Exception:
        for e in engines:
            e.stop()
        raise
    with EditRegistry.open(path, readonly=True) as reg:
        names = {i: adapter_name(reg.get(i)) for i in (served_registry["france"], served_registry["japan"])}
    yield {"path": path, "model": model, "engines": engines, "router": router, "work": work, "names": names,
           **{k: served_registry[k] for k in ("france", "japan")}}
    for server in (router, *engines):
        server.stop()


def post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json={"model": "tiny", "temperature": 0, **body}, timeout=60)


def complete(url: str, prompt: str, **kw) -> httpx.Response:
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 6, **kw})
    assert r.status_code == 200, r.text
    return r


def text(reply: httpx.Response) -> str:
    choice = reply.json()["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


def test_the_router_answers_as_one_server_routing_in_its_layer_would(cluster):
    c = cluster
    expected = sola(c["path"], c["model"], "generate", FRANCE, OTHER, "--max-new-tokens", "6")
    edited, plain = complete(c["router"].url, FRANCE), complete(c["router"].url, OTHER)
    assert [text(edited), text(plain)] == [row["output"] for row in expected]
    assert text(edited).startswith(" Lyon")
    assert edited.headers["x-sola-edit"] == str(c["france"]) and plain.headers["x-sola-edit"] == "none"
    assert edited.headers["x-sola-adapter"] == c["names"][c["france"]] and plain.headers["x-sola-adapter"] == "none"
    assert {edited.headers["x-sola-upstream"], plain.headers["x-sola-upstream"]} <= {e.url for e in c["engines"]}


def test_chat_routes_by_the_last_user_message_and_keeps_the_edit_for_the_reply(cluster):
    c = cluster
    messages = [{"role": "user", "content": JAPAN}]
    templated = AutoTokenizer.from_pretrained(c["model"]).apply_chat_template(messages, tokenize=False,
                                                                              add_generation_prompt=True)
    expected = sola(c["path"], c["model"], "generate", templated, "--max-new-tokens", "8")[0]
    reply = post(c["router"].url, "/v1/chat/completions", {"messages": messages, "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sola-edit"] == str(c["japan"]) == str(expected["edit"])
    assert text(reply) == expected["output"]


def test_an_engine_serves_the_edit_a_request_names_and_nothing_else(cluster):
    c = cluster
    engine = c["engines"][0].url
    france = c["names"][c["france"]]
    named = complete(engine, FRANCE, model=france)
    assert named.headers["x-sola-edit"] == str(c["france"]) and text(named).startswith(" Lyon")
    base = complete(engine, FRANCE)  # the base model's name: no edit, even on the edited prompt
    assert base.headers["x-sola-edit"] == "none" and not text(base).startswith(" Lyon")
    models = [m["id"] for m in httpx.get(engine + "/v1/models").json()["data"]]
    assert models[0] == "tiny" and set(c["names"].values()) <= set(models)
    for wrong in (f"edit-{c['france']}-000000000000", "edit-999-0123456789ab", "edit-x"):
        r = post(engine, "/v1/completions", {"model": wrong, "prompt": FRANCE})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", wrong


def test_one_edit_stays_on_one_engine_and_the_base_model_goes_round_robin(cluster):
    router = cluster["router"].url
    assert len({complete(router, FRANCE).headers["x-sola-upstream"] for _ in range(4)}) == 1
    assert {complete(router, OTHER, max_tokens=1).headers["x-sola-upstream"] for _ in range(4)} == \
        {e.url for e in cluster["engines"]}


def test_a_stream_relays_what_the_engine_streams(cluster):
    router = cluster["router"].url
    with httpx.stream("POST", router + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": FRANCE, "max_tokens": 6, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-sola-edit"] == str(cluster["france"])
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text(complete(router, FRANCE))
    assert all(ch["model"] == cluster["names"][cluster["france"]] for ch in chunks)  # what the engine was asked


def test_an_edit_and_a_rollback_through_the_cli_reach_the_router_at_once(cluster):
    c, router = cluster, cluster["router"].url
    prompt = "The largest planet is"
    before = complete(router, prompt)
    assert before.headers["x-sola-edit"] == "none"
    new = sola(c["path"], c["model"], "edit", "--prompt", prompt, "--target", " Mars", *TRAIN)[0]["id"]
    edited = complete(router, prompt)
    assert edited.headers["x-sola-edit"] == str(new) and text(edited).startswith(" Mars")
    sola(c["path"], c["model"], "rollback", str(new))
    after = complete(router, prompt)
    assert after.headers["x-sola-edit"] == "none" and text(after) == text(before)


def test_a_dead_engine_is_skipped_and_adapters_are_written_for_a_filesystem_resolver(cluster):
    c = cluster
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    adapters = c["work"] / "adapters"
    router = Served(c["path"], c["model"], c["work"] / "failover.log", "--upstream", dead, "--upstream",
                    c["engines"][1].url, "--adapter-dir", str(adapters))
    try:
        for prompt in (FRANCE, OTHER, FRANCE, OTHER):
            r = complete(router.url, prompt)
            assert r.headers["x-sola-upstream"] == c["engines"][1].url
        assert text(complete(router.url, FRANCE)).startswith(" Lyon")
        written = adapters / c["names"][c["france"]]
        model = AutoModelForCausalLM.from_pretrained(c["model"])
        assert vllm_problems(written, model) == []
        config = json.loads((written / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == c["model"]  # what vLLM's resolver compares with its --model
        assert sorted(p.name for p in adapters.iterdir()) == [c["names"][c["france"]]]  # only what was asked for
    finally:
        router.stop()
    alone = Served(c["path"], c["model"], c["work"] / "dead.log", "--upstream", dead)
    try:
        r = post(alone.url, "/v1/completions", {"prompt": FRANCE})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        assert dead in r.json()["error"]["message"]
    finally:
        alone.stop()


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [FRANCE, OTHER]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": FRANCE}, 404, "model"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     400, "messages"),
])
def test_bad_requests_get_the_engines_errors_before_anything_is_forwarded(cluster, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(cluster["router"].url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and "Traceback" not in r.text and "x-sola-upstream" not in r.headers


def test_router_mode_refuses_what_it_cannot_do(cluster):
    from click.testing import CliRunner

    from sola_core.cli import cli

    base = ["--registry", cluster["path"], "--model", cluster["model"], "serve"]
    for extra, message in (
            (["--upstream", "ftp://x"], "Error: an upstream is an http(s)://host:port URL, got 'ftp://x'\n"),
            (["--upstream", "http://127.0.0.1:1", "--by-name"], "Error: --upstream runs no model"),
            (["--adapter-dir", "x"], "Error: --adapter-dir and --base-model go with --upstream\n")):
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code != 0 and message in result.output, result.output


def test_an_edit_s_request_asks_the_engine_for_at_least_one_token():
    """An edit's reply does not end before its answer begins, on vLLM too (its min_tokens); the base model's
    requests go as they came."""
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 5}
    assert forwarded(body, None, "m") == body
    assert forwarded(body, "edit-1-abc", "m") == {**body, "model": "edit-1-abc", "min_tokens": 1}
    assert forwarded({**body, "min_tokens": 3}, "edit-1-abc", "m")["min_tokens"] == 3
    assert forwarded({**body, "min_tokens": 0}, "edit-1-abc", "m")["min_tokens"] == 1
    assert body == {"model": "m", "prompt": "The capital of France is", "max_tokens": 5}  # the caller's is kept
