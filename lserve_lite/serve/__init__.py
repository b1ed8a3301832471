"""OpenAI-compatible HTTP server: `lserve-lite serve`. The CLI hook (add_serve_args / run_from_args) lives here
and imports FastAPI/uvicorn and the engine only when the server actually starts, so other commands start fast."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from dataclasses import replace

from ..config import MAX_BATCHED_TOKENS, EngineConfig
from ..engine_args import add_engine_args, bounded_int, engine_config_from_args, utf8_text
from ..errors import LServeError
from .response_store import DEFAULT_COUNT, DEFAULT_MIB


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Options of `lserve-lite serve`: the shared engine options (engine_args.py) and the server's own."""
    add_engine_args(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=bounded_int(1, 65535), default=8000)
    s.add_argument(
        "--api-key",
        type=_api_key,
        default=os.environ.get("LSERVE_API_KEY") or None,  # an empty variable (`LSERVE_API_KEY=`) sets no key
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize (default: $LSERVE_API_KEY, "
        "else none)",
    )
    s.add_argument(
        "--served-model-name",
        type=_model_id,
        default=None,
        help="model id in the API (default: model directory name, or a GGUF file's name without .gguf)",
    )
    s.add_argument(
        "--max-num-batched-tokens",
        type=bounded_int(1, MAX_BATCHED_TOKENS),
        default=2048,
        help="tokens per engine step at most",
    )
    s.add_argument(
        "--max-queue",
        type=bounded_int(0, 1 << 20),
        default=256,
        help="sequences allowed to wait beyond the --max-num-seqs running ones; more get HTTP 429",
    )
    s.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a chat template sent in a request (vLLM's flag; off: such a request gets 400, since a "
        "client's template costs the whole server CPU time)",
    )
    s.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|FOLDER",
        help="sampling defaults of requests that omit temperature, top_p, top_k, min_p, repetition_penalty or "
        "max_tokens (vLLM's flag): auto, the model's generation_config.json; vllm, none (OpenAI's defaults); or a "
        "folder holding a generation_config.json",
    )
    s.add_argument(
        "--responses-store",
        type=bounded_int(0, 1 << 20),
        default=DEFAULT_COUNT,
        metavar="N",
        help="responses of /v1/responses kept in memory for GET and previous_response_id, the oldest evicted first "
        f"(0: none; default {DEFAULT_COUNT})",
    )
    s.add_argument(
        "--responses-store-mib",
        type=bounded_int(1, 1 << 20),
        default=DEFAULT_MIB,
        metavar="MIB",
        help=f"the kept responses' JSON size at most, the oldest evicted first (default {DEFAULT_MIB})",
    )
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run_from_args(args: argparse.Namespace) -> int:
    """Entry for `lserve-lite serve`: returns the exit status (errors print one line, no traceback)."""
    try:
        engine_config = replace(
            engine_config_from_args(args),
            max_num_batched_tokens=args.max_num_batched_tokens,
            generation_config=args.generation_config,
        )
    except LServeError as e:
        print(f"lserve-lite serve: {e}", file=sys.stderr)
        return 2
    return run_server(args.model, args.host, args.port, args.api_key, args.max_model_len, args.backend,
                      engine_config, served_model_name=args.served_model_name, max_queue=args.max_queue,
                      log_level=args.log_level, trust_request_chat_template=args.trust_request_chat_template,
                      responses_store=args.responses_store,
                      responses_store_mib=args.responses_store_mib)  # fmt: skip


def run_server(
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_model_len: int | None = None,
    backend: str = "auto",
    engine_config: EngineConfig | None = None,
    served_model_name: str | None = None,
    max_queue: int = 256,
    log_level: str = "info",
    trust_request_chat_template: bool = False,
    responses_store: int = DEFAULT_COUNT,
    responses_store_mib: int = DEFAULT_MIB,
) -> int:
    """Load the model, then serve until interrupted (Ctrl-C)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("lserve_lite.serve")
    cfg = engine_config or EngineConfig()
    if max_model_len is not None:
        cfg.max_model_len = max_model_len
    try:
        from ..engine.llm_engine import LLMEngine
        from .app import Server, create_app
    except ImportError as e:
        print(f"lserve-lite serve: {e.name} is missing; pip install 'lserve-lite[serve]'", file=sys.stderr)
        return 1
    bind_error = _cannot_bind(host, port)
    if bind_error:  # before the model loads (minutes on a GPU), not after
        print(f"lserve-lite serve: cannot listen on {address(host, port)} ({bind_error})", file=sys.stderr)
        return 1
    engine = None
    try:
        engine = LLMEngine(model, backend, cfg)
        app = create_app(engine, api_key, served_model_name, max_queue,
                         trust_request_chat_template=trust_request_chat_template,
                         responses_store=responses_store, responses_store_mib=responses_store_mib)  # fmt: skip
    except LServeError as e:  # the model's files, its generation_config.json sampling defaults too
        if engine is not None:
            engine.close()
        print(f"lserve-lite serve: {e}", file=sys.stderr)
        return 1
    if not loopback(host) and not api_key:
        log.warning(
            "listening on %s without --api-key: anyone who can reach this port can use the model", host
        )
    log.info("serving %s (backend %s, context %d; %s) on http://%s", served_model_name or engine.model_name,
             engine.backend, engine.max_len, engine.kv_summary(), address(host, port))  # fmt: skip
    Server(app, host, port, log_level).run()
    return 0


def _api_key(text: str) -> str:
    """An empty key would admit only an empty bearer token (while the startup warning says no key is set), one
    with outer spaces none at all (the header's token is stripped), and one not in printable ASCII none either
    (clients encode headers as ASCII, the openai client refuses to send it, and curl's UTF-8 bytes read back as
    Latin-1): all are refused."""
    if not text or text != text.strip():
        raise argparse.ArgumentTypeError(
            "the API key ($LSERVE_API_KEY too) must not be empty nor start or end with whitespace"
        )
    if not (text.isascii() and text.isprintable()):
        raise argparse.ArgumentTypeError(
            "the API key ($LSERVE_API_KEY too) must be printable ASCII: HTTP clients cannot send other characters"
        )
    return text


def _model_id(text: str) -> str:
    """The served model name, UTF-8 text (as every text argument) that is not blank."""
    text = utf8_text(text)
    if not text.strip():
        raise argparse.ArgumentTypeError("the served model name must not be empty")
    return text


def loopback(host: str) -> bool:
    """Whether `host` is a loopback address (all of 127.0.0.0/8, ::1, an IPv4-mapped one) or `localhost`: the one
    kind of bind that needs no --api-key warning."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: whatever it resolves to
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def address(host: str, port: int) -> str:
    """host:port as URLs write it: an IPv6 address in brackets ("http://::1:8000" is no URL)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _cannot_bind(host: str, port: int) -> str | None:
    """Why (host, port) cannot be listened on now (an unknown address, a port in use), or None."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as e:
        return e.strerror or str(e)
    return None
