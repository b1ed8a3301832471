"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, errors, SSE streaming, and a server runner."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.llm_engine import LLMEngine
from ..errors import InvalidRequestError
from . import add_serve_args, run_from_args, run_server
from .async_engine import AsyncEngine, RequestHandle
from .metrics import Metrics
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, decode, new_id, now, parse, usage

log = logging.getLogger("lserve_lite.serve")
__all__ = ["create_app", "ServerThread", "add_serve_args", "run_from_args", "run_server"]

MAX_BODY_BYTES = 8 << 20  # a request body larger than this gets 413 before it is parsed
PROMPT_CHARS_PER_TOKEN = 16  # prompts over 16 characters per token of context get 400 before tokenizing


def create_app(
    engine: LLMEngine,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
) -> FastAPI:
    """An app serving `engine`; its engine thread runs for the app's lifespan.

    Requests over `max_body_bytes` get 413, prompts over `max_prompt_chars` characters (default:
    PROMPT_CHARS_PER_TOKEN x the context length) get 400, both before any tokenization.
    """
    metrics = Metrics()
    prompt_limit = max_prompt_chars or PROMPT_CHARS_PER_TOKEN * engine.max_len
    aengine = AsyncEngine(engine, max_queue, metrics)
    model_name = served_model_name or engine.model_name
    created = now()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start(asyncio.get_running_loop())
        yield
        aengine.shutdown()

    app = FastAPI(title="lserve-lite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = aengine

    # -- errors: always OpenAI-shaped JSON, never a traceback --------------------------------------
    def error_response(e: ApiError) -> JSONResponse:
        metrics.error(e.status)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(ApiError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(ApiError(500, "internal server error"))

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            )

    def check_model(name: str | None) -> None:
        if name and name != model_name:
            raise ApiError(404, f"model {name!r} not found (this server serves {model_name!r})", "model",
                           "model_not_found")  # fmt: skip

    # -- plain endpoints ------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not aengine.alive:
            raise ApiError(503, "the engine thread is not running")
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        gauges = {
            "requests_running": ("Requests being batched by the engine.", len(engine.scheduler.running)),
            "requests_waiting": ("Requests queued for the engine (not yet scheduled).", aengine.num_waiting),
            "requests_in_flight": ("Requests admitted and not finished.", aengine.num_in_flight),
            "kv_pages_used": ("KV cache pages in use.", engine.blocks.num_used),
            "kv_pages_total": ("KV cache pages in the pool.", engine.blocks.num_pages),
            "kv_capacity_tokens": (
                "Tokens the KV pool holds.",
                engine.blocks.num_pages * engine.ecfg.page_size,
            ),
            f'kv_cache_info{{dtype="{engine.kv_format.name}"}}': ("The KV cache format (--kv-dtype).", 1),
        }
        counters = {
            "prompt_tokens_cached_total": (
                "Prompt tokens whose KV came from the prefix cache (every admission).",
                engine.scheduler.prompt_tokens_cached,
            ),
            "prompt_tokens_computed_total": (
                "Prompt tokens run through the model (recomputation after preemption included).",
                engine.prompt_tokens_computed,
            ),
        }
        text = metrics.render(gauges, counters)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lserve-lite",
                "max_model_len": engine.max_len}  # fmt: skip

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request):
        check_key(request)
        check_model(model)
        return model_card()

    # -- generation -----------------------------------------------------------------------------
    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"the request body has {declared} bytes; at most {max_body_bytes} allowed")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
            chunks.append(chunk)
        return decode(b"".join(chunks))

    def check_prompt_size(req: ChatCompletionRequest | CompletionRequest) -> None:
        n = req.prompt_chars()
        if n > prompt_limit:
            where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
            raise ApiError(400, f"the prompt has {n} characters; at most {prompt_limit} allowed", where,
                           "context_length_exceeded")  # fmt: skip

    def tokenize(req: ChatCompletionRequest | CompletionRequest) -> list[int]:
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        try:
            if isinstance(req, ChatCompletionRequest):
                return check_ids(engine.tokenizer.encode_chat([m.as_dict() for m in req.messages]))
            p = req.prompt
            return check_ids(engine.tokenizer.encode(p) if isinstance(p, str) else p)
        except InvalidRequestError as e:
            raise ApiError(400, str(e), where) from None

    def check_ids(ids: list[int]) -> list[int]:
        vocab = engine.cfg.vocab_size
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        if not all(0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        return ids

    def max_new_tokens(req: ChatCompletionRequest | CompletionRequest, n: int) -> int:
        limit, where = engine.max_len, "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        if n >= limit:
            raise ApiError(400, f"the prompt has {n} tokens; the context limit is {limit} tokens (prompt + output)",
                           where, "context_length_exceeded")  # fmt: skip
        if req.max_tokens is None:
            return limit - n
        if n + req.max_tokens > limit:
            raise ApiError(400, f"the context limit is {limit} tokens (prompt + output); the prompt has {n} tokens "
                           f"and max_tokens is {req.max_tokens}", "max_tokens", "context_length_exceeded")  # fmt: skip
        return req.max_tokens

    async def generate(request: Request, chat: bool):
        check_key(request)
        req = parse(ChatCompletionRequest if chat else CompletionRequest, await read_json(request))
        check_model(req.model)
        check_prompt_size(req)
        prompt_ids = await asyncio.to_thread(tokenize, req)
        params = req.sampling_params(max_new_tokens(req, len(prompt_ids)))
        rid = new_id("chatcmpl" if chat else "cmpl")
        handle = await aengine.submit(prompt_ids, params, rid)
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now(),
                "model": model_name}  # fmt: skip
        if req.stream:
            return EventStream(handle, sse_events(handle, base, chat, req.include_usage))
        text, last = await collect(request, handle)
        reason = last.finish_reason
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        body = base | {"object": "chat.completion" if chat else "text_completion", "choices": [choice]}
        return body | {"usage": usage(last.num_prompt_tokens, last.num_output_tokens, last.num_cached_tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    return app


async def collect(request: Request, handle: RequestHandle):
    """All of a non-streamed request's text; a client that goes away meanwhile aborts it."""
    watch = asyncio.create_task(_on_disconnect(request, handle.close))
    parts, last = [], None
    try:
        async for out in handle:
            parts.append(out.text)
            last = out
    finally:
        watch.cancel()
        handle.close()
    return "".join(parts), last


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    callback()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def sse_events(
    handle: RequestHandle, base: dict, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI stream chunks, then (with include_usage) a usage chunk, then `data: [DONE]`."""
    extra = {"usage": None} if include_usage else {}

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse(base | {"choices": [choice]} | extra)

    try:
        if chat:
            yield chunk("", role=True)
        async for out in handle:
            if out.text:
                yield chunk(out.text)
            if out.finished:
                yield chunk(None, out.finish_reason)
                if include_usage:
                    yield _sse(
                        base
                        | {
                            "choices": [],
                            "usage": usage(
                                out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens
                            ),
                        }
                    )
    except ApiError as e:
        yield _sse(e.body())
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that aborts its request however the response ends (done, disconnect, error)."""

    def __init__(self, handle: RequestHandle, events: AsyncIterator[str]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.close()


class ServerThread:
    """uvicorn in a background thread, for tests and benchmarks: `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
