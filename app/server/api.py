"""`build_app(engine, settings, tokenizer)`: the OpenAI-compatible FastAPI app.

The same app runs inside the Ray Serve ingress replica and under uvicorn (mp backend); all it
needs is an `Engine` (strata/engine_protocol.py), the served settings and the model's tokenizer
(None with skip_tokenizer_init). The app tokenizes, validates, fans out `n` and turns engine
deltas into text itself (one OutputProcessor per app); the engine only ever sees token ids. A
background task polls the engine's stats, feeding the metrics gauges and the backpressure
estimate.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from strata.app.output.processor import OutputProcessor
from strata.app.server.chat import ChatServing
from strata.app.server.completions import CompletionServing
from strata.app.server.engine_client import EngineClient
from strata.app.server.errors import error_response, install_error_handlers, model_not_found
from strata.app.server.metrics import ServerMetrics
from strata.app.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from strata.app.server.settings import ServerSettings
from strata.app.server.tokenizer import ServerTokenizer
from strata.engine_protocol import Engine

logger = logging.getLogger("strata.server")
T = TypeVar("T")
OPEN_PATHS = frozenset({"/health"})


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
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        response = error_response(401, "Unauthorized: this server needs a valid API key "
                                       "(header `Authorization: Bearer <key>`).")
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
    processor = OutputProcessor(tokenizer)
    metrics = ServerMetrics(names[0])
    completions = CompletionServing(client, tokens, processor, settings, names, metrics)
    chat = ChatServing(client, tokens, processor, settings, names, metrics)

    async def refresh(step_times: bool = False) -> None:
        metrics.update_stats(await asyncio.wait_for(client.stats(), settings.health_timeout_s))
        if step_times:
            metrics.update_step_times(await asyncio.wait_for(client.step_times(), settings.health_timeout_s))

    async def poll() -> None:
        tick = 0
        while True:
            try:
                await refresh(step_times=tick % 20 == 0)  # step times are bulkier: every 20th poll
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
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.state.client, app.state.settings, app.state.metrics = client, settings, metrics
    app.state.tokenizer = tokens

    def check_model(model: str | None) -> None:
        if model is not None and model not in names:
            raise model_not_found(model)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await unless_disconnected(request, completions.create(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await unless_disconnected(request, chat.create(body))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=names[0], max_model_len=client.max_model_len) for n in names])

    @app.get("/health")
    async def health() -> Response:
        ok = await client.healthy(settings.health_timeout_s)
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": strata_version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        try:
            await refresh(step_times=True)
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
        return DetokenizeResponse(prompt=await tokens.decode(body.tokens))

    return app
