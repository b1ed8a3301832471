"""The OpenAI-compatible HTTP API (FastAPI): routes, auth, errors, SSE streaming, and a server runner."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine.llm_engine import LLMEngine
from ..engine.tool_calls import ToolPlan, call_form, prompt_messages
from ..errors import InvalidRequestError, PromptTooLongError
from . import add_serve_args, run_from_args, run_server
from .async_engine import AsyncEngine, RequestHandle
from .logprobs import LogprobFormatter
from .metrics import Metrics
from .protocol import (
    MAX_CHOICES,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    body_limits,
    check_body_size,
    decode,
    new_id,
    now,
    param_of,
    parse,
    prompt_size,
)
from .response_store import DEFAULT_COUNT, DEFAULT_MIB, ResponseStore
from .responses import Choices, EventStream, close_all, collect, sse_events
from .responses_api import create_response, stored_reply

log = logging.getLogger("lserve_lite.serve")
__all__ = ["create_app", "ServerThread", "add_serve_args", "run_from_args", "run_server"]

MAX_BODY_BYTES = 8 << 20  # a request body larger than this gets 413 before it is parsed
# prompts over 64 characters per token of context get 400 before tokenizing: none fits (runs of one character,
# the densest text measured, tokenize at ~60 a token with SmolLM2's tokenizer), and tokenizing costs time in its size
PROMPT_CHARS_PER_TOKEN = 64
SHUTDOWN_GRACE_S = 5  # after Ctrl-C / SIGTERM (requests aborted): how long responses may take to end


def create_app(
    engine: LLMEngine,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_chars: int | None = None,
    trust_request_chat_template: bool = False,
    responses_store: int = DEFAULT_COUNT,
    responses_store_mib: int = DEFAULT_MIB,
) -> FastAPI:
    """An app serving `engine`; its engine thread runs for the app's lifespan.

    Requests over `max_body_bytes` get 413, prompts over `max_prompt_chars` characters (default:
    PROMPT_CHARS_PER_TOKEN x the context length) get 400, both before any tokenization; so does a chat prompt
    whose rendering is longer. A chat request's own `chat_template` is refused unless
    `trust_request_chat_template` (vLLM's --trust-request-chat-template): the sandbox bounds a template's steps
    and output, but a client's template is code that costs the whole server CPU time (docs/SERVE.md). The
    Responses API keeps up to `responses_store` responses of `responses_store_mib` MiB (0: none), the oldest evicted.
    """
    defaults = engine.sampling_defaults  # the model's sampling fields, checked before any request
    metrics = Metrics()
    prompt_limit = max_prompt_chars or PROMPT_CHARS_PER_TOKEN * engine.max_len
    body_counts = body_limits(engine.max_len, prompt_limit)
    aengine = AsyncEngine(engine, max_queue, metrics)
    model_name = served_model_name or engine.model_name
    formatter = LogprobFormatter(engine.tokenizer)
    # calls get the ids that the template takes back (Mistral's: 9 characters); strict tools' grammar is the format
    # the model writes calls in (<tool_call> blocks, Mistral's or Llama's), where it is one a grammar here writes
    form = call_form(engine.tokenizer)
    created = now()
    store = ResponseStore(responses_store, responses_store_mib << 20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        aengine.start(asyncio.get_running_loop())
        yield
        aengine.shutdown()
        engine.close()

    app = FastAPI(title="lserve-lite", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(NoTrailingSlash)
    app.state.engine = aengine

    # -- errors: always OpenAI-shaped JSON, never a traceback --------------------------------------
    def error_response(e: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
        """`headers`: the HTTP error's own (a 405's Allow, which RFC 9110 requires)."""
        metrics.error(e.status)
        headers = (headers or {}) | ({"Retry-After": "1"} if e.status == 429 else {})
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail)), e.headers)

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

    def check_model(name: object) -> None:
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "model: must be a string", "model")
        if name and name != model_name:
            raise ApiError(404, f"model {name!r} not found (this server serves {model_name!r})", "model",
                           "model_not_found")  # fmt: skip

    # -- plain endpoints ------------------------------------------------------------------------
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not aengine.alive:
            raise ApiError(503, "the engine thread is not running")
        fault = engine.fault()
        if fault:
            raise ApiError(503, fault)
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        pools = engine.kv_pages()
        used, total = pools["context"]
        gauges = {
            "requests_running": ("Requests being batched by the engine.", len(engine.scheduler.running)),
            "requests_waiting": ("Requests queued for the engine (not yet scheduled).", aengine.num_waiting),
            "requests_in_flight": ("Requests admitted and not finished.", aengine.num_in_flight),
            "kv_pages_used": ("KV cache pages in use (the pool that holds the context).", used),
            "kv_pages_total": ("KV cache pages in the pool that holds the context.", total),
            "kv_capacity_tokens": ("Tokens the KV pool holds.", total * engine.ecfg.page_size),
            f'kv_cache_info{{dtype="{engine.kv_format.name}"}}': ("The KV cache format (--kv-dtype).", 1),
        }
        if "streaming" in pools:
            gauges["kv_stream_pages_used"] = ("Streaming-pool pages in use (LServe).", pools["streaming"][0])
            gauges["kv_stream_pages_total"] = ("Streaming-pool pages (LServe).", pools["streaming"][1])
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
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_body_bytes:
                    raise ApiError(413, f"the request body exceeds {max_body_bytes} bytes")
                chunks.append(chunk)
        except ClientDisconnect:  # a client's cancel, not a server fault: nginx's 499, no traceback logged
            raise ApiError(499, "the client closed the connection before its request body ended") from None
        # off the event loop: a large body's checks would stall every stream for their time (seconds at 8 MiB)
        return await asyncio.to_thread(decode_body, b"".join(chunks))

    def decode_body(raw: bytes) -> dict:
        """A body counted against what a valid request to this engine holds, then decoded."""
        check_body_size(raw, body_counts)
        return decode(raw)

    def too_long(detail: str, param: str) -> ApiError:
        """A prompt (or prompt + output) over the context: OpenAI's code, and its sentence in the message, which
        clients match there (LiteLLM raises its ContextWindowExceededError, which its fallbacks catch, on the
        sentence; the code is not in the text it reads)."""
        return ApiError(400, f"{detail}; this model's maximum context length is {engine.max_len} tokens (prompt + "
                        "output)", param, "context_length_exceeded")  # fmt: skip

    def check_prompt_size(body: dict, chat: bool) -> None:
        """Prompts too long for the context, or too many of them, get 400 before validation and tokenization
        (each costs time in its size); a prompt of the whole context is left to `max_new_tokens` (scorable). Run in
        a worker thread, as `decode`: measuring 460,000 messages of an 8 MiB body held the event loop 0.5 s."""
        chars, ids, prompts = prompt_size(body, chat)
        where = "messages" if chat else "prompt"
        if chars > prompt_limit:
            raise too_long(f"the prompt has {chars} characters; at most {prompt_limit} allowed", where)
        if ids > engine.max_len:
            raise too_long(f"the prompt has {ids} tokens", where)
        if prompts > MAX_CHOICES:
            raise ApiError(400, f"a request holds at most {MAX_CHOICES} prompts", where)

    def validate(body: dict, chat: bool) -> ChatCompletionRequest | CompletionRequest:
        """A body's prompt size checked, then the body validated, in a worker thread: pydantic's validation of
        17,000 messages held the event loop, and so every stream, 0.05 s."""
        check_prompt_size(body, chat)
        req = parse(ChatCompletionRequest if chat else CompletionRequest, body)
        if chat:
            req.fit_tools(form)
        return req

    def tools_failed(plan: ToolPlan) -> bool:
        """Whether the grammar of a plan that holds failed to build on the tools' part: the request's own format,
        which shares it under "auto", builds alone (a build already made is cached)."""
        if plan.field == "tools":
            return True
        try:
            engine.grammars.matcher(plan.format)
        except InvalidRequestError:
            return False
        return True

    def tokenize(req: ChatCompletionRequest | CompletionRequest, generating: bool = True) -> list[list[int]]:
        """Each prompt's token ids (one for chat); only a prompt to generate from must not be empty (/tokenize
        counts "" as 0 tokens, as vLLM's)."""
        where = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        try:
            if isinstance(req, ChatCompletionRequest):
                if req.chat_template is not None and not trust_request_chat_template:
                    raise ApiError(400, "chat_template: this server renders only the model's chat template (start "
                                   "it with --trust-request-chat-template to accept the client's)",
                                   "chat_template")  # fmt: skip
                tok = engine.tokenizer
                msgs, tools = prompt_messages([m.as_dict() for m in req.messages], req.tool_plan,
                                              tok.reads_tools(req.chat_template))  # fmt: skip
                how = (req.add_generation_prompt, req.continue_final_message, req.chat_template,
                       req.chat_template_kwargs)  # fmt: skip
                ids = [tok.encode_chat(msgs, tools, *how, max_chars=prompt_limit)]
            else:
                ids = list(req.prompts())
            return [check_ids(x, generating) for x in ids]
        except PromptTooLongError as e:
            raise too_long(str(e), where) from None
        except InvalidRequestError as e:  # a rendering's error naming its field (else the prompt's)
            msg = str(e)
            named = msg.startswith(("chat_template", "continue_final_message", "tools:"))
            raise ApiError(400, msg, param_of(msg) if named else where) from None

    def check_ids(prompt: str | list[int], generating: bool) -> list[int]:
        """A prompt's ids checked once, in this worker thread (the engine thread takes PromptIds as they are, for each
        of its n candidates): the vocabulary's rule is the engine's; the server adds its empty and context answers."""
        if not generating:  # /tokenize counts "" as 0 tokens, and a prompt of any length
            text = isinstance(prompt, str)
            return engine.encode_prompt(prompt) if text else engine.vocab_ids(prompt, "prompt")
        if not prompt:
            raise InvalidRequestError("the prompt is empty")
        if not isinstance(prompt, str):  # OpenAI's context error before the engine reads an id
            fits_context(len(prompt))
        ids = engine.prompt_ids(prompt)
        fits_context(len(ids))
        return ids

    def fits_context(n: int) -> None:
        """A prompt of n tokens leaves no room in the context: OpenAI's context error."""
        if n > engine.max_len:
            raise PromptTooLongError(f"the prompt has {n} tokens")

    def max_new_tokens(req: ChatCompletionRequest | CompletionRequest, n: int) -> int:
        limit, where = engine.max_len, "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
        # CompletionRequest.scores_only: one token, left out of the reply; a prompt of the whole context is
        # scorable (the engine takes one token after it: LLMEngine.add_request)
        scores_only = req.max_tokens == 0
        if n > limit or (n == limit and not scores_only):
            raise too_long(f"the prompt has {n} tokens", where)
        if req.max_tokens is None:  # the model's max_new_tokens, as vLLM, within the context left
            return min(limit - n, defaults.get("max_new_tokens", limit))
        if scores_only:
            return 1
        if n + req.max_tokens > limit:
            field = req.max_tokens_field
            raise too_long(f"the prompt has {n} tokens and {field} is {req.max_tokens}", field)
        return req.max_tokens

    async def generate(request: Request, chat: bool, body: dict | None = None):
        """`body`: a chat body made from another API's request (the Responses API's), else the request's."""
        check_key(request)
        body = await read_json(request) if body is None else body
        req = await asyncio.to_thread(validate, body, chat)
        check_model(req.model)
        prompts = await asyncio.to_thread(tokenize, req)
        jobs = [
            (ids, c)
            for ids in prompts
            for c in req.sampling_params(max_new_tokens(req, len(ids)), defaults).candidates()
        ]
        rid = new_id("chatcmpl" if chat else "cmpl")
        # all at once, so that they reach the engine in one step: the first candidate of a prompt prefills
        # it, the others wait for its pages and attach them from the prefix cache
        try:
            got = await aengine.submit(
                [(ids, c, rid if len(jobs) == 1 else f"{rid}-{i}") for i, (ids, c) in enumerate(jobs)],
                "prompt" if len(prompts) > 1 else "n",  # the field whose count made too many sequences
                req.cache_salt,
            )
        except ApiError as e:  # none started (an invalid schema, no room)
            got = [e]
        handles: list[RequestHandle] = [h for h in got if isinstance(h, RequestHandle)]
        failed = next((e for e in got if isinstance(e, BaseException)), None)
        plan = req.tool_plan if chat else None
        if failed is not None:
            close_all(handles)
            if (
                plan
                and plan.holds
                and isinstance(failed, ApiError)
                and failed.param == "response_format"
                and await asyncio.to_thread(tools_failed, plan)
            ):
                raise ApiError(
                    400, "tools: the functions' parameters:" + failed.message.partition(":")[2], "tools"
                )
            raise failed
        texts = (
            [p if isinstance(p, str) else engine.tokenizer.decode(p, False) for p in req.prompts()]
            if not chat and req.echo
            else []
        )
        shape = Choices(chat, req, plan, prompts, texts, formatter)
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": now(),
                "model": model_name}  # fmt: skip
        if req.stream:
            events = sse_events(handles, base, shape, req.include_usage, lambda e: metrics.error(e.status))
            return EventStream(handles, events)
        choices, use = await collect(request, handles, shape)
        return base | {
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": use,
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    # -- vLLM's token endpoints: a prompt (or a conversation, as chat renders it) to ids, and back -------
    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        check_key(request)
        body = await read_json(request)
        req, strs = await asyncio.to_thread(tokenize_request, body)
        check_model(req.model)
        (ids,) = await asyncio.to_thread(tokenize, req, False)
        # vLLM's token_strs (null unless asked), off the event loop: a million ids' strings take 0.3 s
        pieces = await asyncio.to_thread(engine.tokenizer.pieces, ids) if strs else None
        return {"count": len(ids), "max_model_len": engine.max_len, "tokens": ids, "token_strs": pieces}

    def tokenize_request(body: dict) -> tuple[ChatCompletionRequest | CompletionRequest, bool | None]:
        """/tokenize's body checked and validated (with return_token_strs), in a worker thread as `validate`."""
        chat = "messages" in body
        if chat == ("prompt" in body):
            raise ApiError(400, "send either a prompt or messages", "prompt")
        if not chat and not isinstance(body["prompt"], str):
            raise ApiError(400, "prompt: must be a string", "prompt")
        check_prompt_size(body, chat)
        strs = body.get("return_token_strs")  # vLLM's Optional[bool]: null is its default, False
        if strs is not None and type(strs) is not bool:
            raise ApiError(400, "return_token_strs: must be a boolean", "return_token_strs")
        # with vLLM's fields of /tokenize that change the ids: what this server cannot honour is refused, not dropped
        template = (
            "add_generation_prompt",
            "continue_final_message",
            "chat_template",
            "chat_template_kwargs",
        )
        keys = ("model", "add_special_tokens") + (
            ("messages", "tools", "tool_choice", "parallel_tool_calls", *template) if chat else ("prompt",)
        )
        model = ChatCompletionRequest if chat else CompletionRequest
        return parse(model, {k: body[k] for k in keys if k in body}), strs

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        check_key(request)
        body = await read_json(request)
        return {"prompt": await asyncio.to_thread(detokenize, body)}

    def detokenize(body: dict) -> str:
        """/detokenize's text, in a worker thread: checking and decoding the 2 million ids an 8 MiB body holds
        took 0.46 s, which on the event loop held every stream."""
        ids, vocab = body.get("tokens"), engine.cfg.vocab_size
        if not isinstance(ids, list) or not all(type(t) is int and 0 <= t < vocab for t in ids):
            raise ApiError(400, f"tokens: must be a list of token ids in [0, {vocab})", "tokens")
        check_model(body.get("model"))
        return engine.tokenizer.decode(ids, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/responses")
    async def responses(request: Request):
        check_key(request)
        body = await read_json(request)
        return await create_response(body, model_name, lambda chat: generate(request, True, chat), store)

    @app.api_route("/v1/responses/{rid:path}", methods=["GET", "DELETE"])
    async def stored_response(rid: str, request: Request):
        check_key(request)
        return stored_reply(store, request.method, rid, dict(request.query_params))

    return app


class NoTrailingSlash:
    """Serves a path with a trailing slash as the path without ("/v1/chat/completions/", "/v1/models/": a base URL's
    slash): Starlette answered it with a 307 of empty body, which a client follows without its POST body, if at
    all."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await self.app(scope, receive, send)


class Server(uvicorn.Server):
    """uvicorn's server for an app of `create_app`. Told to exit (Ctrl-C, SIGTERM), it aborts the requests in flight
    (uvicorn waits for open connections, and a stream could go on to the context limit: Ctrl-C seemed to hang),
    then gives their responses SHUTDOWN_GRACE_S to end."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str):
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)  # fmt: skip
        super().__init__(config)
        self.aengine: AsyncEngine = app.state.engine

    def handle_exit(self, sig: int, frame) -> None:
        super().handle_exit(sig, frame)
        if self.aengine.loop is not None:
            self.aengine.loop.call_soon_threadsafe(self.aengine.abort_all)


class ServerThread:
    """uvicorn in a background thread, for tests and benchmarks: `with ServerThread(app) as url: ...`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.server = Server(app, host, port, log_level)
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
