"""`build_app(engine, settings, tokenizer)`: the OpenAI-compatible FastAPI app.

The same app runs inside the Ray Serve ingress replica and under uvicorn (mp backend); all it
needs is an `Engine` (strata/engine_protocol.py), the served settings and the model's tokenizer
(None with skip_tokenizer_init). The app tokenizes, validates, fans out `n` and turns engine
deltas into text itself (one OutputProcessor per app); the engine only ever sees token ids. A
background task polls the engine's stats, feeding the metrics gauges and the backpressure
estimate.

Nothing here blocks the event loop, and /health and /metrics never queue behind the engine:
each waits a bounded time for one shared call (engine_client.SingleFlight), /metrics then
serving the last numbers it has. Request bodies are bounded (MAX_BODY_BYTES, 413) and must be
UTF-8 before anything parses them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from strata.app.output.processor import OutputProcessor
from strata.app.server.chat import ChatServing
from strata.app.server.completions import CompletionServing
from strata.app.server.drain import Drain, DrainMiddleware
from strata.app.server.engine_client import EngineClient
from strata.app.server.errors import error_response, install_error_handlers, model_not_found
from strata.app.server.metrics import ServerMetrics
from strata.app.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from strata.app.server.protocol_chat import ChatCompletionRequest
from strata.app.server.protocol_completions import CompletionRequest
from strata.app.server.settings import ServerSettings
from strata.app.server.structured_fields import GrammarCheck
from strata.app.server.tokenizer import ServerTokenizer
from strata.app.server.vllm_routes import install_vllm_extras, route_path
from strata.engine_protocol import Engine, outside_vocabulary

logger = logging.getLogger("strata.server")
T = TypeVar("T")
OPEN_PATHS = frozenset({"/health", "/ping"})  # /ping: SageMaker's health check, which sends no key
# The largest request body taken (413 beyond): a prompt of the longest context in any script,
# JSON-escaped, fits many times over. A module constant until ServerSettings has a field for it.
MAX_BODY_BYTES = 4 << 20
METRICS_WAIT_S = 1.0  # /metrics waits at most this long for fresh engine numbers
HEALTH_WAIT_S = 0.8  # /health answers within a second, whatever the engine is doing


@cache
def strata_version() -> str:
    try:
        return version("strata")
    except PackageNotFoundError:
        return "unknown"


class ApiKeyMiddleware:
    """401 for every route but /health without `Authorization: Bearer <api_key>`. Plain ASGI (not
    BaseHTTPMiddleware) so streaming and disconnects pass through untouched, and it runs before
    the body is parsed: a stranger learns nothing, not even that their JSON was malformed."""

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or route_path(scope) in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        response = error_response(401, "Unauthorized: this server needs a valid API key "
                                       "(header `Authorization: Bearer <key>`).")
        await response(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, before any of it is parsed (a declared
    Content-Length is refused unread; a chunked body is counted as it comes), and 400 for a body
    that is not UTF-8. The body is then handed on whole, and after it the server's own `receive`,
    so the app still hears of a client that goes away. Plain ASGI, as ApiKeyMiddleware."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(int(declared), scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished sending
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(size, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            bad = body[err.start:err.start + 1].hex()
            response = error_response(400, f"The request body is not valid UTF-8 (byte 0x{bad} at offset "
                                           f"{err.start}).")
            return await response(scope, receive, send)
        handed = False

        async def replay() -> dict:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, size: int, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"The request body is too large: it has {size} bytes or more, and the "
                                       f"server takes at most {self.limit}.")
        await response(scope, receive, send)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Runs `work`, cancelling it if the client hangs up first (a non-streaming request would
    otherwise keep generating for nobody; cancelling it aborts its engine request)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task  # let its cleanup (the engine abort) run
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


def build_app(engine: Engine, settings: ServerSettings, tokenizer: Any | None = None) -> FastAPI:
    """The app serving `engine`. `settings.served_model_name` names the model (the launchers
    fill it in from the model's facts); `tokenizer` is the model's (transformers), loaded once
    by the caller, or None with skip_tokenizer_init (then only token-id prompts work)."""
    names = settings.served_model_name or ["strata"]
    client = EngineClient(engine)
    tokens = ServerTokenizer(tokenizer)
    tokens.default_template = settings.chat_template
    processor = OutputProcessor(tokenizer)
    metrics = ServerMetrics(names[0])
    grammars = GrammarCheck(tokenizer, client.info.vocab_size)  # one compiler and cache for both routes
    completions = CompletionServing(client, tokens, processor, settings, names, metrics, grammars)
    chat = ChatServing(client, tokens, processor, settings, names, metrics, grammars)

    async def refresh(wait_s: float, step_times: bool = False) -> None:
        """Fresh engine numbers into the metrics, waiting at most `wait_s` for each call."""
        metrics.update_stats(await client.stats(wait_s))
        if step_times:
            metrics.update_step_times(await client.step_times(wait_s))

    async def poll() -> None:
        tick = 0
        while True:
            try:
                await refresh(settings.health_timeout_s, step_times=tick % 20 == 0)  # step times are bulkier
            except Exception:  # noqa: BLE001 - /health reports it; keep polling
                logger.debug("stats poll failed", exc_info=True)
            tick += 1
            await asyncio.sleep(settings.stats_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(poll())
        yield
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    app = FastAPI(title="Strata OpenAI-compatible API", version=strata_version(), lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=MAX_BODY_BYTES)
    if settings.api_key:  # added after the body limit, so it runs first: a stranger's body is never read
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    install_vllm_extras(app, settings, tokens)  # outside the key check: a CORS preflight needs no key
    # Outermost: during the shutdown drain every request, /health too, gets 503 (app/server/drain.py).
    app.state.drain = Drain(settings.retry_after_s)
    app.add_middleware(DrainMiddleware, drain=app.state.drain)
    app.state.client, app.state.settings, app.state.metrics = client, settings, metrics
    app.state.tokenizer = tokens

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise model_not_found(model)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await unless_disconnected(request, completions.create(body, request.headers.get("x-request-id")))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await unless_disconnected(request, chat.create(body, request.headers.get("x-request-id")))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=settings.model_root or names[0],
                                         max_model_len=client.max_model_len) for n in names])

    @app.get("/health")
    async def health() -> Response:
        """200 only while the engine is serving; the body says its state, the last fault (which
        rank, why) and how many recoveries there were. Waits at most HEALTH_WAIT_S."""
        state, answered = await client.health(min(HEALTH_WAIT_S, settings.health_timeout_s))
        body = {"state": state.state, "reason": state.reason, "failed_rank": state.failed_rank,
                "recoveries": state.recoveries, "answered": answered}
        if not answered:
            body["reason"] = f"the engine did not answer within {min(HEALTH_WAIT_S, settings.health_timeout_s):g} s"
        metrics.update_health(state)
        return JSONResponse(body, status_code=200 if answered and state.serving else 503)

    @app.get("/ping", operation_id="ping_get")
    @app.post("/ping", operation_id="ping_post")
    async def ping() -> Response:
        """SageMaker's health check (vLLM's /ping): the same answer as /health."""
        return await health()

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": strata_version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        try:
            await refresh(min(METRICS_WAIT_S, settings.health_timeout_s), step_times=True)
        except asyncio.TimeoutError:
            logger.debug("the engine did not answer in time; /metrics serves the last numbers")
        except Exception:  # noqa: BLE001 - serve the last values rather than nothing
            logger.warning("metrics refresh failed", exc_info=True)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            return error_response(400, "Give exactly one of prompt or messages.", "prompt")
        if body.messages is not None:
            conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
            _, ids = await tokens.chat_prompt(conversation, body.add_generation_prompt)
        else:
            ids = await tokens.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(count=len(ids), max_model_len=client.max_model_len, tokens=ids)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        bad = outside_vocabulary(body.tokens, tokens.vocab_size) if tokens.available else []
        if bad:
            return error_response(400, f"tokens: cannot decode token ids {bad}: they are outside the tokenizer's "
                                       f"vocabulary [0, {tokens.vocab_size}).", "tokens")
        return DetokenizeResponse(prompt=await tokens.decode(body.tokens))

    return app
