"""Where the API key comes from (--api-key, STRATA_API_KEY, then vLLM's VLLM_API_KEY) and that the
start-up log says whether auth is on."""

from __future__ import annotations

import argparse

import pytest

from strata.app.server.settings import ServerSettings
from strata.config import EngineConfig


@pytest.fixture
def key_env(monkeypatch):
    for name in ("STRATA_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_vllm_api_key_is_honoured(key_env):
    assert ServerSettings().api_key is None
    key_env.setenv("VLLM_API_KEY", "from-vllm")
    assert ServerSettings().api_key == "from-vllm"
    key_env.setenv("STRATA_API_KEY", "from-strata")
    assert ServerSettings().api_key == "from-strata"  # Strata's own name first
    key_env.setenv("STRATA_API_KEY", "")
    assert ServerSettings().api_key == "from-vllm"  # empty is unset


def test_the_api_key_flag_wins_over_both_variables(key_env):
    from strata.app.serve_cli import add_serve_parser, configs_from_args

    key_env.setenv("VLLM_API_KEY", "v")
    key_env.setenv("STRATA_API_KEY", "s")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    _, settings = configs_from_args(parser.parse_args(["serve", "--api-key", "flag"]))
    assert settings.api_key == "flag"
    _, settings = configs_from_args(parser.parse_args(["serve"]))
    assert settings.api_key == "s"


def test_the_serve_yaml_path_reads_vllm_api_key_too(key_env):
    from strata.app.server.serve_app import split_args

    key_env.setenv("VLLM_API_KEY", "v")
    assert split_args({})[1].api_key == "v"
    assert split_args({"api_key": "k"})[1].api_key == "k"


def test_the_start_up_log_says_whether_auth_is_on(key_env, smollm2_dir, caplog):
    from strata.app.server.launch import _prepare

    config = EngineConfig(model=smollm2_dir, max_model_len=256)
    key_env.setenv("VLLM_API_KEY", "v")
    with caplog.at_level("INFO", logger="strata"):
        _prepare(config, ServerSettings())
    assert "API key auth is on (key from $VLLM_API_KEY)" in caplog.text
    key_env.delenv("VLLM_API_KEY")
    caplog.clear()
    with caplog.at_level("INFO", logger="strata"):
        _prepare(config, ServerSettings(host="0.0.0.0"))
    [record] = [r for r in caplog.records if "API key auth" in r.getMessage()]
    assert record.levelname == "WARNING"  # open, and reachable from elsewhere
    assert "API key auth is OFF: every route at http://0.0.0.0:8000 answers anyone" in record.getMessage()
    assert "VLLM_API_KEY" in record.getMessage()


def test_auth_summary_names_the_flag_when_the_key_came_from_it(key_env):
    assert "key from --api-key" in ServerSettings(api_key="k").auth_summary()
