"""`sola serve --upstream URL ...`: route by text in front, let other engines (vLLM, or `sola serve --by-name`) run
the language model.

With the encoder key, which edit applies to a request is decided from its text alone. So this process runs no
language model: per request it computes the query exactly as the in-layer router does (the prompt's tokens, and
for a chat the last user message, through the same key source), finds the edit (same threshold, tombstones and
per-line queries: `registry.match`), and forwards the request unchanged but for `model`, which names the edit's
adapter (`edit-<id>-<12 hex of its adapter's sha256>`, immutable per version) or the base model, and, for an edit,
`min_tokens` (`forwarded`). The answer,
streamed or not, comes back as the upstream sent it, with headers saying which edit (`X-Sola-Edit`), adapter
(`X-Sola-Adapter`) and upstream (`X-Sola-Upstream`) served it.

Requests for one adapter go to the same upstream (rendezvous hashing over the healthy ones), so its adapter
cache stays warm; requests for the base model go round robin. An upstream that fails (no connection, a timeout,
a 5xx) rests for `rest_s` and the request is retried once on the next one. With `adapter_dir`, each edit's PEFT
directory is written there before the first request that names it (what vLLM's filesystem resolver loads).
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError as PydanticError

from registry import EditRegistry, ValidationError
from registry.errors import CorruptEdit
from registry.peft_format import adapter_name

from .keys import EncoderKey
from .routing import EditMentions, nearest_edits
from .server import APIError, Message, add_error_handlers, chat_text

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("content-type", "cache-control")  # of the upstream's reply; hop-by-hop ones never


class Upstreams:
    """The engines requests go to, and which of them are resting after a failure."""

    def __init__(self, urls: list[str], rest_s: float = 10.0) -> None:
        if not urls:
            raise ValidationError("give at least one upstream URL")
        for url in urls:
            if not (url.startswith(("http://", "https://")) and httpx.URL(url).host):
                raise ValidationError(f"an upstream is an http(s)://host:port URL, got {url!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.rest_s = rest_s
        self._resting: dict[str, float] = {}  # url -> when it may be tried again
        self._turn = itertools.count()

    def order(self, adapter: str | None) -> list[str]:
        """Upstreams to try, best first: healthy ones before resting ones; for an adapter, by rendezvous score (the
        same upstream while it is healthy, and only its requests move when it fails), else round robin."""
        now = time.monotonic()
        if adapter is None:
            start = next(self._turn) % len(self.urls)
            ranked = self.urls[start:] + self.urls[:start]
        else:
            ranked = sorted(self.urls, key=lambda u: hashlib.sha256(f"{u}\n{adapter}".encode()).digest(), reverse=True)
        return sorted(ranked, key=lambda u: self._resting.get(u, 0.0) > now)  # stable: keeps the ranking

    def failed(self, url: str) -> None:
        self._resting[url] = time.monotonic() + self.rest_s

    def worked(self, url: str) -> None:
        self._resting.pop(url, None)

    def health(self) -> list[dict]:
        now = time.monotonic()
        return [{"url": u, "healthy": self._resting.get(u, 0.0) <= now} for u in self.urls]


class TextRouter:
    """The edit a request's text routes to, decided as a served forward decides it, with no language model."""

    def __init__(self, registry: EditRegistry, tokenizer, keys: EncoderKey, adapter_dir: str | None = None,
                 base_model: str = "") -> None:
        if registry.config.key_source != EncoderKey.name:
            raise ValidationError(f"routing in front of other engines needs a registry with the encoder key source; "
                                  f"this one uses {registry.config.key_source!r} (the language model's own states)")
        self.registry, self.tokenizer, self.keys = registry, tokenizer, keys
        self.edit_mentions = EditMentions(registry, keys.embed)
        self.adapter_dir, self.base_model = (Path(adapter_dir) if adapter_dir else None), base_model

    def edit_for(self, text: str) -> int | None:
        self.registry.refresh()  # edits and rollbacks made by other processes since the last request
        enc = self.tokenizer([text], return_tensors="pt")
        queries, mentions = self.keys.from_tokens(enc["input_ids"], enc.get("attention_mask"))  # (1, S, d)
        edit = int(nearest_edits(self.registry, queries.float(), mentions, self.edit_mentions)[0])
        return None if edit < 0 else edit

    def adapter(self, edit_id: int) -> str | None:
        """The edit's immutable adapter name; its PEFT directory is written first when there is an adapter dir.
        None (the base model) for an edit whose adapter fails its check, as the in-layer router does."""
        name = adapter_name(self.registry.get(edit_id))
        if self.adapter_dir is not None and not (self.adapter_dir / name).is_dir():
            try:
                self.registry.export_peft_adapter(self.adapter_dir, edit_id, self.base_model)
            except CorruptEdit as e:
                log.warning("edit %d not applied, serving the base model instead: %s", edit_id, e)
                return None
        return name


class Proxy:
    def __init__(self, router: TextRouter, upstreams: Upstreams, model_name: str, timeout_s: float = 600.0) -> None:
        self.router, self.upstreams, self.model_name = router, upstreams, model_name
        self.timeout_s = timeout_s
        self.client: httpx.AsyncClient | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sola-keys")  # the encoder runs off the event loop

    async def decide(self, text: str) -> tuple[int | None, str | None]:
        loop = asyncio.get_running_loop()

        def run() -> tuple[int | None, str | None]:
            edit = self.router.edit_for(text)
            adapter = None if edit is None else self.router.adapter(edit)
            return (edit, adapter) if adapter else (None, None)
        return await loop.run_in_executor(self._worker, run)

    async def forward(self, path: str, body: dict, text: str) -> Response:
        if body.get("model") != self.model_name:
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")
        edit, adapter = await self.decide(text)
        body = forwarded(body, adapter, self.model_name)
        tried = []
        for url in self.upstreams.order(adapter)[:2]:  # the first choice, and one retry elsewhere
            tried.append(url)
            request = self.client.build_request("POST", url + path, json=body)
            try:
                reply = await self.client.send(request, stream=True)
            except httpx.HTTPError as e:
                log.warning("upstream %s failed: %s", url, e)
                self.upstreams.failed(url)
                continue
            if reply.status_code >= 500:
                await reply.aclose()
                log.warning("upstream %s answered %d", url, reply.status_code)
                self.upstreams.failed(url)
                continue
            self.upstreams.worked(url)
            headers = {k: v for k, v in reply.headers.items() if k.lower() in FORWARDED_HEADERS}
            headers.update({"X-Sola-Edit": "none" if edit is None else str(edit), "X-Sola-Upstream": url,
                            "X-Sola-Adapter": adapter or "none"})
            return StreamingResponse(relay(reply), status_code=reply.status_code, headers=headers)
        raise APIError(502, f"no upstream answered (tried {', '.join(tried)})", kind="server_error",
                       code="upstream_unavailable")


async def relay(reply: httpx.Response):
    try:
        async for part in reply.aiter_raw():
            yield part
    finally:
        await reply.aclose()


def forwarded(body: dict, adapter: str | None, base_model: str) -> dict:
    """The request as an upstream gets it: `model` names the edit's adapter, or the base model; and an edit's reply
    does not end before its answer begins, as in a server routing in its layer (`routing.Router`): `min_tokens` of
    at least 1 (vLLM's extension; `sola serve --by-name` ignores the field and rules the end out itself)."""
    if adapter is None:
        return {**body, "model": base_model}
    asked = body.get("min_tokens")
    least = asked if isinstance(asked, int) and not isinstance(asked, bool) and asked >= 1 else 1
    return {**body, "model": adapter, "min_tokens": least}


def request_text(path: str, body: dict, tokenizer) -> str:
    """The text a request is routed by: the prompt, or the conversation in the model's chat template (the key
    source then reads the last user message out of it, as it does in a served forward)."""
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        try:
            parsed = [Message.model_validate(m) for m in messages]
        except PydanticError as e:
            raise APIError(400, f"messages: {e.errors()[0].get('msg', 'invalid value')}", "messages") from None
        return chat_text(tokenizer, parsed)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or len(prompts) != 1 or not isinstance(prompts[0], str) or not prompts[0]:
        raise APIError(400, "prompt must be one non-empty string (send one request per prompt: each may route to "
                            "another edit)", "prompt")
    return prompts[0]


def create_proxy_app(proxy: Proxy) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        proxy.client = httpx.AsyncClient(timeout=httpx.Timeout(proxy.timeout_s, connect=5.0))
        try:
            yield
        finally:
            await proxy.client.aclose()
            proxy._worker.shutdown(wait=False)

    app = FastAPI(title="sola serve --upstream", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": proxy.model_name, "mode": "router", "upstreams": proxy.upstreams.health(),
                "active_edits": proxy.router.registry.count("active")}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": proxy.model_name, "object": "model", "owned_by": "sola"}]}

    async def handle(request: Request, path: str) -> Response:
        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return await proxy.forward(path, body, request_text(path, body, proxy.router.tokenizer))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "/v1/chat/completions")

    return app


def serve_proxy(proxy: Proxy, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_proxy_app(proxy), host=host, port=port, log_level=log_level)
