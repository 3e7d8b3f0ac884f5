"""vLLM's OpenAI-server flags on `strata serve`: each parses into its ServerSettings field, in
vLLM's spellings (underscores too); contradictions and missing files fail naming the flag."""

from __future__ import annotations

import argparse

import pytest

from strata.app.vllm_flags import FlagError


def settings_of(*argv: str):
    from strata.app.serve_cli import add_serve_parser, configs_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return configs_from_args(parser.parse_args(["serve", *argv]))[1]


def test_every_server_flag_reaches_its_setting(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    key.write_text("k")
    cert.write_text("c")
    s = settings_of("--served-model-name", "a", "b", "--chat-template", str(template), "--response-role", "bot",
                    "--root-path", "/p", "--enable_prompt_tokens_details", "--enable-force-include-usage",
                    "--enable-request-id-headers", "--return-tokens-as-token-ids", "--enable-tokenizer-info-endpoint",
                    "--enable-server-load-tracking", "--enable-log-requests", "--max-log-len", "7",
                    "--allowed-origins", '["https://a.example"]', "--allowed-credentials",
                    "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    assert s.served_model_name == ["a", "b"] and s.chat_template == template.read_text()
    assert (s.response_role, s.root_path, s.max_log_len) == ("bot", "/p", 7)
    assert all((s.enable_prompt_tokens_details, s.enable_force_include_usage, s.enable_request_id_headers,
                s.return_tokens_as_token_ids, s.enable_tokenizer_info_endpoint, s.enable_server_load_tracking,
                s.enable_log_requests, s.allowed_credentials))
    assert s.allowed_origins == ["https://a.example"] and (s.ssl_keyfile, s.ssl_certfile) == (str(key), str(cert))
    plain = settings_of("--disable-log-requests")
    assert not plain.enable_log_requests and plain.allowed_origins is None and plain.chat_template is None
    assert settings_of("--chat-template", "{{ messages[0].content }}").chat_template == "{{ messages[0].content }}"


@pytest.mark.parametrize("argv, words", [
    (["--enable-log-requests", "--disable-log-requests"], "--enable-log-requests and --disable-log-requests"),
    (["--chat-template", "no-such-file.jinja"], "--chat-template no-such-file.jinja"),
    (["--ssl-keyfile", "/no/such/key.pem", "--ssl-certfile", "/no/such/c.pem"], "--ssl-keyfile /no/such/key.pem"),
])
def test_bad_server_flags_name_themselves(argv, words):
    with pytest.raises(FlagError, match=words):
        settings_of(*argv)


def test_ssl_files_go_together(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("k")
    with pytest.raises(FlagError, match="--ssl-keyfile and --ssl-certfile go together"):
        settings_of("--ssl-keyfile", str(key))
