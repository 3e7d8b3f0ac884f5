"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers turn every failure into that shape with the right status: a malformed body or schema
-> 400 (not FastAPI's 422), a ValueError from sampling parameters or the engine -> 400 naming
the field, unknown model -> 404, key -> 401, overload -> 503 with Retry-After. Anything else is a
500 whose message is logged here and kept short for the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from strata.app.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("strata.server")

# vLLM's error type names, by status.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 500: "InternalServerError", 503: "ServiceUnavailableError"}

# Request fields a ValueError's message may start with (SamplingParams names the field first).
_KNOWN_PARAMS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
    "top_logprobs", "prompt_logprobs", "prompt", "messages", "model", "best_of", "max_completion_tokens",
}


class APIError(Exception):
    """An error the client caused (or must wait out), with the status it maps to."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param, code=status))


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param).model_dump(), status_code=status, headers=headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", "model")


def overloaded(waiting: int, limit: int, retry_after_s: int) -> APIError:
    return APIError(503, f"The server is overloaded: {waiting} requests are waiting (limit {limit}). "
                         f"Retry after {retry_after_s} s.", headers={"Retry-After": str(retry_after_s)})


def param_of(message: str) -> str | None:
    """The request field a ValueError's message names first, if it is one we know."""
    head = message.split(" ", 1)[0].strip(":,.")
    return head if head in _KNOWN_PARAMS else None


def from_value_error(err: ValueError) -> APIError:
    message = str(err)
    return APIError(400, message, param_of(message))


def _describe_validation(err: RequestValidationError) -> tuple[str, str | None]:
    problems, param = [], None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {e.get('msg')}")
    return "Invalid request: " + "; ".join(problems), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(err)
        return error_response(400, message, param)

    @app.exception_handler(ValueError)
    async def _value_error(_: Request, err: ValueError) -> JSONResponse:
        api = from_value_error(err)
        return error_response(api.status, api.message, api.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error: {type(err).__name__}: {err}")
