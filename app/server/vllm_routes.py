"""vLLM's server extras around the OpenAI routes, each behind vLLM's flag of the same name:
the X-Request-Id response header (--enable-request-id-headers), CORS (--allowed-origins),
GET /load (--enable-server-load-tracking: requests in flight on the generation routes) and
GET /tokenizer_info (--enable-tokenizer-info-endpoint). /ping lives beside /health in api.py.

The middlewares are plain ASGI (as api.py's), so streams and disconnects pass through untouched.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from strata.app.server.errors import APIError
from strata.app.server.settings import ServerSettings
from strata.app.server.tokenizer import ServerTokenizer

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def route_path(scope: dict) -> str:
    """The path the routes see: under --root-path, uvicorn puts the prefix in front of it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class RequestIdHeaderMiddleware:
    """Every response carries X-Request-Id: the request's own, else a fresh one."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given or uuid.uuid4().hex.encode()

        async def with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, with_header)


class ServerLoad:
    """Requests in flight on the generation routes, a stream counted until its last byte."""

    def __init__(self) -> None:
        self.in_flight = 0


class LoadTrackingMiddleware:
    def __init__(self, app: Any, load: ServerLoad):
        self.app = app
        self.load = load

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or route_path(scope) not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        # Counted until the response's last byte, not until the app call returns: FastAPI may
        # hand a stream's body to a task of its own.
        self.load.in_flight += 1
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done = True
                self.load.in_flight -= 1

        async def counted(message: dict) -> None:
            try:
                await send(message)
            finally:
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    finish()

        try:
            await self.app(scope, receive, counted)
        except BaseException:  # a client gone mid-stream makes its send fail: counted out here
            finish()
            raise


def tokenizer_info(tokens: ServerTokenizer) -> dict[str, Any]:
    """The tokenizer's class and its configuration (what tokenizer_config.json says), as vLLM's."""
    tok = tokens.tokenizer
    info: dict[str, Any] = {"tokenizer_class": type(tok).__name__}
    for key, value in getattr(tok, "init_kwargs", {}).items():
        value = str(value) if hasattr(value, "content") else value  # AddedToken -> its text
        try:
            json.dumps(value)
        except TypeError:
            continue
        info[key] = value
    info["chat_template"] = tokens.default_template or getattr(tok, "chat_template", None)
    return info


def install_vllm_extras(app: FastAPI, settings: ServerSettings, tokens: ServerTokenizer) -> None:
    """Adds what the flags ask for. Call after the app's own middlewares, so CORS runs first
    (a browser's preflight is answered before the key is asked for)."""
    if settings.enable_server_load_tracking:
        load = app.state.server_load = ServerLoad()
        app.add_middleware(LoadTrackingMiddleware, load=load)

        @app.get("/load")
        async def server_load() -> dict[str, int]:
            return {"server_load": load.in_flight}

    if settings.enable_tokenizer_info_endpoint:
        @app.get("/tokenizer_info")
        async def get_tokenizer_info() -> dict[str, Any]:
            if not tokens.available:
                raise APIError(404, "This server runs without a tokenizer (skip_tokenizer_init).")
            return tokenizer_info(tokens)

    if settings.enable_request_id_headers:
        app.add_middleware(RequestIdHeaderMiddleware)
    if settings.allowed_origins is not None:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins,
                           allow_credentials=settings.allowed_credentials, allow_methods=settings.allowed_methods,
                           allow_headers=settings.allowed_headers)
