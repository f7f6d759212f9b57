"""`sola serve`: the edited model behind an OpenAI-compatible HTTP API (FastAPI on uvicorn; extra `serve`).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streaming as server-sent events), /health, and,
only when an admin token was given at start, /admin/edits (edit, rollback, restore). Requests are checked and
tokenized here, on the event loop; the model runs on one worker thread that batches whatever is waiting
(batching.py). Which edit served each choice is in its `sola_edit` field and in the `X-Sola-Edit` header
(comma-separated per choice, `none` for the base model); OpenAI clients keep unknown fields, so neither breaks them.

With `by_name` (`sola serve --by-name`) the server routes nothing: a request names its edit as vLLM is asked for
a LoRA adapter, by the edit's immutable adapter name (`edit-<id>-<12 hex>`, registry/peft_format.py), or the base
model by its name. It is what `sola serve --upstream` (proxy.py) forwards to when the engines are our own.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from registry.errors import EditNotFound, RegistryError
from registry.peft_format import adapter_name

from .batching import Admin, Batcher, Generation
from .chat import render
from .config import FORMS, TrainConfig
from .decode import Sampling
from .generation import context_length

log = logging.getLogger(__name__)

MAX_CHOICES = 16  # n x prompts per request; the batch limit bounds what runs at once anyway
CHAT_MAX_TOKENS = 512  # a chat reply's length when the request names none (a reply that never ends holds its batch)
ADAPTER_NAME = re.compile(r"edit-([0-9]+)-([0-9a-f]{12})")


class APIError(Exception):
    """An OpenAI-style error: JSON body {"error": {message, type, param, code}} with a 4xx status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Decoding(BaseModel):
    """The fields both endpoints share. Fields OpenAI defines that do not change the reply here (user, ...) are
    accepted and ignored; ones that would change it and are not supported are refused (`refused`)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: the reply never ends on an end token


class CompletionRequest(Decoding):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Decoding):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list | None = None
    response_format: dict | None = None


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    target: str
    form: Literal[FORMS] = "completion"  # type: ignore[valid-type]
    paraphrases: list[str] = []
    subject: str | None = None


SUPPORTED_ONLY_AS = {  # fields that would change the reply, and the values this engine gives them (the defaults)
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {}), "echo": (False,),
    "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None,), "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}


def refused(req: Decoding) -> None:
    """Refuse what this engine cannot do instead of silently ignoring it."""
    for name, allowed in SUPPORTED_ONLY_AS.items():
        if name in type(req).model_fields and getattr(req, name) not in allowed:
            raise APIError(400, f"{name} is not supported by this server", name)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or not all(stops):
        raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
    return tuple(stops)


class Server:
    """The app's state: the editor behind the batcher, and a tokenizer of its own for checking requests (the
    worker thread uses the editor's; a fast tokenizer must not be used from two threads at once)."""

    def __init__(self, editor, model_name: str, max_rows: int = 16, admin_token: str | None = None,
                 by_name: bool = False) -> None:
        self.editor, self.model_name, self.admin_token, self.by_name = editor, model_name, admin_token, by_name
        self.tokenizer = copy.deepcopy(editor.tokenizer)
        self.context = context_length(editor.model)
        ends = editor.model.generation_config.eos_token_id if editor.model.generation_config else None
        ends = set(ends if isinstance(ends, list) else [ends]) | {editor.tokenizer.eos_token_id}
        self.batcher = Batcher(editor, {e for e in ends if e is not None}, max_rows=max_rows)
        self.started = int(time.time())

    # -- turning a request into rows -------------------------------------------------------------
    def named_edit(self, name: str) -> int | None:
        """The edit a request's `model` names under `by_name` (None: the base model's name)."""
        if name == self.model_name:
            return None
        if self.by_name and (match := ADAPTER_NAME.fullmatch(name)):
            try:
                record = self.editor.registry.get(int(match[1]))
            except EditNotFound:
                record = None
            if record is not None and adapter_name(record) == name:  # the same id retrained has another name
                return record.id
        also = " and its edits' adapters (GET /v1/models lists them)" if self.by_name else ""
        raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}{also}",
                       "model", "model_not_found")

    def rows(self, req: Decoding, prompts: list[str], max_tokens: int | None, default_tokens: int):
        """(token ids per row, Sampling per row, prompt tokens, the edit per row when the request names one (under
        `by_name`) else None): each prompt n times."""
        edit = self.named_edit(req.model)
        refused(req)
        stops = stop_strings(req.stop)
        ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        longest = max(len(i) for i in ids)
        room = self.context - longest if self.context else None
        if room is not None and room < 1:
            raise APIError(400, f"the prompt is {longest} tokens; this model's maximum context length is "
                                f"{self.context} tokens", None,
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_tokens if room is None else min(default_tokens, room)
        if max_tokens < 1 or (room is not None and max_tokens > room):
            raise APIError(400, f"max_tokens must be between 1 and {room} for this prompt ({longest} tokens of a "
                                f"{self.context}-token context), got {max_tokens}", "max_tokens")
        if len(prompts) * req.n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} choices per request (prompts x n)", "n")
        sampling = [Sampling(max_tokens, req.temperature, req.top_p, stops,
                             None if req.seed is None else req.seed + j, req.ignore_eos)
                    for _ in prompts for j in range(req.n)]
        rows = [i for i in ids for _ in range(req.n)]
        return rows, sampling, sum(len(i) for i in ids), [edit] * len(rows) if self.by_name else None

    # -- running on the worker -------------------------------------------------------------------
    async def events(self, rows, sampling, edits) -> tuple[list, asyncio.Queue, Generation]:
        """Queue a generation; returns (edit per row, the event queue, the job) once its prompt pass has run."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = Generation(rows, sampling, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev), edits)
        self.batcher.submit(job)
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if first[0] == "error":
            raise APIError(500, first[1], kind="server_error")
        return first[1], queue, job

    async def admin(self, run) -> Any:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        self.batcher.submit(Admin(run, lambda ev: loop.call_soon_threadsafe(done.set_result, ev)))
        kind, value = await done
        if kind == "error":
            if isinstance(value, EditNotFound):
                raise APIError(404, str(value), code="edit_not_found")
            if isinstance(value, RegistryError):  # the request's mistake (ValidationError included); else a bug
                raise APIError(400, str(value))
            raise value
        return value


def chat_text(tokenizer, messages: list[Message]) -> str:
    """The conversation rendered with the model's chat template: the prompt a chat request decodes from (and, in
    router mode, the text it is routed by)."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    conversation = [{"role": m.role, "content": m.text()} for m in messages]
    try:
        return render(tokenizer, conversation)
    except Exception as e:  # the template refused the conversation (e.g. roles out of order)
        raise APIError(400, f"the model's chat template cannot render these messages: {e}", "messages") from None


def edit_header(edits: list) -> dict:
    return {"X-Sola-Edit": ",".join("none" if e is None else str(e) for e in edits)}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-style JSON errors for everything that goes wrong, a bug included (its traceback goes to the log)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        if err.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = loc[0] if loc else None  # the request field; deeper parts name a union's branch or an item
        return APIError(400, f"{field or 'body'}: {err.get('msg', 'invalid value')}", field).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), kind=kind).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # logged with its traceback; the client sees no internals
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "internal server error", kind="server_error").response()


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.batcher.start()
        try:
            yield
        finally:
            server.batcher.close()

    app = FastAPI(title="sola serve", docs_url=None, redoc_url=None, lifespan=lifespan)
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        s = server.batcher.stats
        return {"status": "ok", "model": server.model_name, "queued": server.batcher.pending(),
                "batches": s.batches, "rows": s.rows, "largest_batch": s.largest}

    @app.get("/v1/models")
    async def models():
        names = [server.model_name]
        if server.by_name:
            names += [adapter_name(r) for r in server.editor.registry.records("active")]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": server.started,
                                            "owned_by": "sola"} for name in names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or not all(p for p in prompts):
            raise APIError(400, "prompt must be a non-empty string or list of non-empty strings", "prompt")
        return await respond(server, req, *server.rows(req, prompts, req.max_tokens, 16), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        text = chat_text(server.tokenizer, req.messages)
        rows = server.rows(req, [text], req.max_completion_tokens or req.max_tokens, CHAT_MAX_TOKENS)
        return await respond(server, req, *rows, chat=True)

    if server.admin_token:
        add_admin_routes(app, server)
    return app


async def respond(server: Server, req: Decoding, rows, sampling, used: int, named: list | None, chat: bool):
    created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    edits, queue, job = await server.events(rows, sampling, named)
    base = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": req.model}
    if req.stream:
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return StreamingResponse(stream(base, edits, queue, job, used, chat, include_usage),
                                 media_type="text/event-stream", headers=edit_header(edits))
    texts, finish, tokens = [""] * len(rows), [None] * len(rows), [0] * len(rows)
    try:
        while any(f is None for f in finish):
            ev = await queue.get()
            if ev[0] == "error":
                raise APIError(500, ev[1], kind="server_error")
            _, row, text, done, count = ev
            texts[row] += text
            finish[row], tokens[row] = done, count
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    choices = []
    for i, (text, why, edit) in enumerate(zip(texts, finish, edits)):
        body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text, "logprobs": None}
        choices.append({"index": i, **body, "finish_reason": why, "sola_edit": edit})
    usage = {"prompt_tokens": used, "completion_tokens": sum(tokens), "total_tokens": used + sum(tokens)}
    return JSONResponse({**base, "choices": choices, "usage": usage}, headers=edit_header(edits))


async def stream(base: dict, edits: list, queue: asyncio.Queue, job: Generation, used: int, chat: bool,
                 include_usage: bool):
    base = {**base, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(i: int, text: str | None, why: str | None) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            body = {"delta": delta}
        else:
            body = {"text": text or "", "logprobs": None}
        return {**base, "choices": [{"index": i, **body, "finish_reason": why, "sola_edit": edits[i]}]}

    tokens = [0] * len(edits)
    left = len(edits)
    try:
        if chat:
            for i in range(len(edits)):
                yield sse(chunk(i, None, None))
        while left:
            ev = await queue.get()
            if ev[0] == "error":
                yield sse({"error": {"message": ev[1], "type": "server_error", "param": None, "code": None}})
                return
            _, row, text, done, count = ev
            tokens[row] = count
            if text or done:
                yield sse(chunk(row, text, done))
            left -= done is not None
        if include_usage:
            total = sum(tokens)
            yield sse({**base, "choices": [], "usage": {"prompt_tokens": used, "completion_tokens": total,
                                                        "total_tokens": used + total}})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = left > 0  # the client disconnected mid-stream: free its rows


def add_admin_routes(app: FastAPI, server: Server) -> None:
    """Edit, rollback and restore over HTTP, each behind the admin token (compared in constant time)."""

    def authorize(request: Request) -> None:
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), server.admin_token.encode()):
            raise APIError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'",
                           kind="authentication_error", code="invalid_api_key")

    @app.post("/admin/edits")
    async def add_edit(req: EditRequest, request: Request):
        authorize(request)

        def run(editor):
            edit_id = editor.edit(req.prompt, req.target, TrainConfig(), form=req.form, paraphrases=req.paraphrases,
                                  subject=req.subject)
            return asdict(editor.registry.get(edit_id))
        return await server.admin(run)

    @app.post("/admin/edits/{edit_id}/rollback")
    async def rollback(edit_id: int, request: Request):
        authorize(request)
        return asdict(await server.admin(lambda editor: editor.rollback(edit_id)))

    @app.post("/admin/edits/{edit_id}/restore")
    async def restore(edit_id: int, request: Request):
        authorize(request)
        return asdict(await server.admin(lambda editor: editor.restore(edit_id)))


def serve(server: Server, host: str, port: int, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(create_app(server), host=host, port=port, log_level=log_level)
