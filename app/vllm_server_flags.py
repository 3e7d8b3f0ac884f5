"""vLLM's OpenAI-server flags (`vllm serve --chat-template ... --enable-log-requests ...`), with
vLLM's names and meanings, for `strata serve`: `add_vllm_server_args` adds them to the server
group, `vllm_server_settings` turns them into ServerSettings fields (reading --chat-template's
file here, so the settings carry the template itself to wherever the ingress runs).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from strata.app.vllm_flags import FlagError

_JINJA_MARKS = ("{{", "{%", "{#")


def _json_list(text: str) -> list[str]:
    """vLLM's spelling, a JSON list ('["https://a.example"]'), or one bare value ('*')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return [text]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's contents, or the template itself when it reads like Jinja (as vLLM)."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if any(mark in value for mark in _JINJA_MARKS):
        return value
    raise FlagError(f"--chat-template {value}: no such file, and it does not read as a Jinja template")


def add_vllm_server_args(srv: argparse._ArgumentGroup) -> None:
    srv.add_argument("--chat-template", default=None,
                     help="chat template for every request that brings none: a file, or the template inline "
                          "(default: the tokenizer's)")
    srv.add_argument("--response-role", default="assistant",
                     help="role of chat replies when the request asks for a generation prompt")
    srv.add_argument("--root-path", default=None, help="path prefix when a proxy serves the API under one")
    srv.add_argument("--enable-prompt-tokens-details", action="store_true",
                     help="add usage.prompt_tokens_details (cached_tokens is 0: there is no prefix cache)")
    srv.add_argument("--enable-force-include-usage", action="store_true",
                     help="usage in every stream's last chunk, whatever stream_options says")
    srv.add_argument("--enable-request-id-headers", action="store_true",
                     help="an X-Request-Id header on every response")
    srv.add_argument("--return-tokens-as-token-ids", action="store_true",
                     help="logprob tokens as 'token_id:N' unless a request says otherwise")
    srv.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                     help="serve GET /tokenizer_info (the tokenizer's configuration)")
    srv.add_argument("--enable-server-load-tracking", action="store_true",
                     help="serve GET /load: generation requests in flight")
    srv.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False,
                     help="log every request's prompt and sampling parameters (users' data)")
    srv.add_argument("--disable-log-requests", action="store_true",
                     help="vLLM's older spelling: do not log requests (the default)")
    srv.add_argument("--max-log-len", type=int, default=None,
                     help="characters of prompt (and prompt ids) a request log line keeps (default: all)")
    srv.add_argument("--allowed-origins", type=_json_list, default=None,
                     help="CORS origins, a JSON list ('[\"*\"]' for any); default: no CORS headers at all")
    srv.add_argument("--allowed-credentials", action="store_true", help="CORS: allow credentials")
    srv.add_argument("--allowed-methods", type=_json_list, default=["*"], help="CORS: methods, a JSON list")
    srv.add_argument("--allowed-headers", type=_json_list, default=["*"], help="CORS: headers, a JSON list")
    srv.add_argument("--ssl-keyfile", default=None, help="HTTPS: the private key file (with --ssl-certfile)")
    srv.add_argument("--ssl-certfile", default=None, help="HTTPS: the certificate file (with --ssl-keyfile)")


def vllm_server_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServerSettings fields for the flags above; FlagError for a contradiction or a missing file."""
    if args.enable_log_requests and args.disable_log_requests:
        raise FlagError("--enable-log-requests and --disable-log-requests contradict each other; give one")
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise FlagError(f"{flag} {path}: no such file")
    return dict(
        chat_template=load_chat_template(args.chat_template), response_role=args.response_role,
        root_path=args.root_path, enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_request_id_headers=args.enable_request_id_headers,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        enable_server_load_tracking=args.enable_server_load_tracking,
        enable_log_requests=bool(args.enable_log_requests), max_log_len=args.max_log_len,
        allowed_origins=args.allowed_origins, allowed_credentials=args.allowed_credentials,
        allowed_methods=args.allowed_methods, allowed_headers=args.allowed_headers,
        ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
    )
