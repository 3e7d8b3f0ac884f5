"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers turn every failure into that shape with the right status: a malformed body or schema
-> 400 (not FastAPI's 422), a ValueError from sampling parameters or the engine -> 400 naming
the field, unknown model -> 404, key -> 401, body too large -> 413, overload -> 503 with
Retry-After. Anything else is a 500 whose details stay in the server log: the client gets a
fixed message and an id to quote, never the exception's text.

No message carries internals either way: every one passes `scrub` (no ANSI colour codes, no
traceback, no Ray actor or task ids, no lone surrogates, which JSON cannot encode, bounded length).
"""

from __future__ import annotations

import logging
import re
import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from strata.app.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger("strata.server")

# vLLM's error type names, by status.
_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
          405: "MethodNotAllowedError", 413: "RequestEntityTooLargeError", 500: "InternalServerError",
          503: "ServiceUnavailableError"}
MAX_MESSAGE_CHARS = 2000
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Where Ray's error text starts (RayTaskError / RayActorError: "ray::Driver.generate() (pid=...,
# actor_id=...)"), and a traceback's first line.
_INTERNALS = re.compile(r"ray::|\b(?:actor_id|task_id|node_id|worker_id|pid)=|Traceback \(most recent call last\)")
# FastAPI's words for a body it cannot parse (bad encoding, JSON nested too deeply).
_FASTAPI_PARSE_ERROR = "There was an error parsing the body"

# Request fields a ValueError's message may start with (SamplingParams names the field first).
_KNOWN_PARAMS = {
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
    "top_logprobs", "prompt_logprobs", "prompt", "messages", "model", "best_of", "max_completion_tokens",
    "tokens", "chat_template", "suffix", "echo", "response_format", "tools", "user",
    "logit_bias", "allowed_token_ids", "bad_words", "truncate_prompt_tokens", "truncation_side",
    "logprob_token_ids", "continue_final_message", "stream_options", "chat_template_kwargs",
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


def scrub(message: str) -> str:
    """`message` as a client may see it: ANSI codes and control characters out, lone surrogates
    escaped, cut before anything that reads like Ray's or Python's internals, bounded length."""
    text = _CONTROL.sub("", _ANSI.sub("", message))
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    inside = _INTERNALS.search(text)
    if inside is not None:
        text = text[: inside.start()].rstrip(" :(\n") or "The request failed inside the engine."
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def error_body(status: int, message: str, param: str | None = None) -> ErrorResponse:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return ErrorResponse(error=ErrorInfo(message=scrub(message), type=err_type,
                                         param=scrub(param) if param else param, code=status))


def internal_error(err: BaseException, where: str) -> ErrorResponse:
    """A 500's body: logged here with its traceback under a fresh id; the client gets the id."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s on %s", error_id, where, exc_info=err)
    return error_body(500, f"Internal server error (error id {error_id}); the server log has the details.")


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


def from_value_error(err: ValueError, default_param: str | None = None) -> APIError:
    """A 400 for a ValueError, naming the field its message starts with (else `default_param`).
    An error Ray wrapped (RayTaskError, also a ValueError) is reported by its cause."""
    cause = getattr(err, "cause", None)
    message = scrub(str(cause if isinstance(cause, BaseException) else err))
    return APIError(400, message, param_of(message) or default_param)


def _describe_validation(err: RequestValidationError, limit: int = 5) -> tuple[str, str | None]:
    errors = err.errors()
    # Our own checks (a value_error) say more than the union members a value failed to be.
    ours = [e for e in errors if e.get("type") == "value_error"]
    problems, param = [], None
    for e in ours or errors:
        loc = [str(p) for p in e.get("loc", ()) if p != "body" and not _is_union_tag(p)]
        if e.get("type") == "json_invalid":
            return f"The request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc) or "body"
        problem = f"{where}: {e.get('msg')}"
        if problem not in problems:
            problems.append(problem)
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "Invalid request: " + "; ".join(problems[:limit]) + more, param


def _is_union_tag(part: object) -> bool:
    # pydantic names the union member it tried in `loc`: "str", "list[int]", "function-after[...]".
    return isinstance(part, str) and (part in ("str", "int", "float") or "[" in part)


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
        message = str(err.detail)
        if err.status_code == 400 and message == _FASTAPI_PARSE_ERROR:
            message = "The request body could not be parsed as JSON (not UTF-8, or nested too deeply)."
        return error_response(err.status_code, message, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        body = internal_error(err, f"{request.method} {request.url.path}")
        return JSONResponse(body.model_dump(), status_code=500)
