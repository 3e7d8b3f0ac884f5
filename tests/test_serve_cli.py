"""`strata serve` and its Ray Serve app, in-process against a fake `Engine` (tests/server_fixtures.py):
the flags that cannot be honoured, the configs the flags build, serve-yaml args split into engine
and server settings, and the serve app's engine factory (bound, and started by the replica)."""

from __future__ import annotations

import argparse

import httpx
import pytest

from strata.app.server.settings import ServerSettings
from tests.server_fixtures import FakeEngine, sync


def test_the_serve_app_binds_its_engine_factory():
    from strata.app.server.serve_app import ingress_app
    from strata.config import EngineConfig

    def factory(config, facts):  # pragma: no cover - never started here
        raise AssertionError

    app = ingress_app(EngineConfig(), ServerSettings(served_model_name=["x"]), factory)
    assert app._bound_deployment.init_args[2] is factory


@pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")
@sync
async def test_the_serve_replica_starts_its_engine_through_the_factory(smollm2_dir):
    """The replica class in-process (no Ray): preflight, the tokenizer, the injected engine, the
    app on top; its health check asks the engine; deleting it shuts the engine down."""
    from strata.app.server.serve_app import StrataIngress
    from strata.config import EngineConfig

    started = []

    def factory(config, facts):
        started.append((config, facts))
        return FakeEngine(max_model_len=256, vocab_size=facts.vocab_size)

    config = EngineConfig(model=smollm2_dir, max_model_len=256)
    settings = ServerSettings(api_key=None)
    cls = StrataIngress.func_or_class
    replica = cls.__new__(cls)
    await replica.__init__(config.model_dump(), settings.model_dump(), factory)
    [(got_config, facts)] = started
    assert got_config == config and settings.served_model_name is None  # filled in a copy, not in place
    assert replica.settings.served_model_name == [facts.served_name]
    app = replica.__serve_build_asgi_app__()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        ids = (await client.post("/tokenize", json={"prompt": "Hello there"})).json()["tokens"]
    assert replica.engine.requests[0].prompt_token_ids == ids  # tokenized once, in the replica
    await replica.check_health()
    replica.engine.healthy = False
    with pytest.raises(RuntimeError, match="not healthy"):
        await replica.check_health()
    await replica.__del__()
    assert replica.engine.shut_down


def _serve_args(*argv: str) -> argparse.Namespace:
    from strata.app.serve_cli import add_serve_parser

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


@pytest.mark.parametrize("argv, flag", [
    (["--nnodes", "2"], "--nnodes 2 needs --master-addr"), (["--node-rank", "1"], "--node-rank"),
    (["--headless"], "--headless"), (["--master-addr", "10.0.0.1"], "--master-addr"),
    (["--master-port", "29500"], "--master-port"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--distributed-executor-backend", "ray"], "is for the mp backend"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--node-rank", "1"], "add --headless"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--headless"], "--headless is for --node-rank 1"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "--node-rank", "2", "--headless"], "node_rank=2 must be below"),
    (["--nnodes", "2", "--master-addr", "10.0.0.1", "-tp", "3"], "do not split evenly over nnodes=2"),
    (["--distributed-executor-backend", "mp", "--driver-node", "10.0.0.1"], "--driver-node"),
    (["--distributed-executor-backend", "mp", "--address", "ray://x:10001"], "--address"),
    (["-tp", "0"], "tensor"),
    (["--step-timeout", "0"], "--step-timeout: "), (["--recovery-window", "0"], "--recovery-window: "),
    (["--drain-timeout", "-1"], "--drain-timeout: "),
])
def test_flags_that_cannot_be_honoured_fail_naming_the_flag(argv, flag, capsys):
    args = _serve_args(*argv)
    assert args.func(args) == 2
    assert flag in capsys.readouterr().err


def test_flags_build_the_configs():
    from strata.app.serve_cli import configs_from_args

    config, settings = configs_from_args(_serve_args(
        "m", "-tp", "2", "-pp", "2", "--pp-layer-partition", "3,2", "--served-model-name", "a", "b",
        "--max-model-len", "512", "--port", "9000", "--api-key", "k", "--enforce-eager"))
    assert (config.model, config.tensor_parallel_size, config.pipeline_parallel_size) == ("m", 2, 2)
    assert config.pp_layer_partition == [3, 2] and config.distributed_executor_backend == "ray"
    assert (settings.served_model_name, settings.port, settings.api_key) == (["a", "b"], 9000, "k")


def test_expert_parallel_flags_build_the_config():
    from strata.app.serve_cli import configs_from_args

    config, _ = configs_from_args(_serve_args(
        "m", "-tp", "2", "--enable-expert-parallel", "--ep-dispatch", "alltoall", "--ep-alltoall-min-tokens", "64",
        "--expert-load-interval", "8"))
    assert config.enable_expert_parallel and config.ep_dispatch == "alltoall"
    assert (config.ep_alltoall_min_tokens, config.expert_load_interval) == (64, 8)
    assert configs_from_args(_serve_args("m"))[0].ep_dispatch == "auto"


def test_multi_node_mp_flags_build_the_config():
    from strata.app.serve_cli import configs_from_args

    config, _ = configs_from_args(_serve_args(
        "m", "-tp", "2", "-pp", "2", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
        "--master-port", "29511", "--headless", "--dist-init-timeout", "7"))
    assert config.distributed_executor_backend == "mp"  # auto, with --nnodes and --master-addr
    assert (config.nnodes, config.node_rank, config.master_addr, config.master_port) == (2, 1, "10.0.0.1", 29511)
    assert config.dist_init_timeout_s == 7 and config.world_size == 4


def test_serve_yaml_args_split_and_reject_unknown():
    from strata.app.server.serve_app import split_args

    config, settings = split_args({"max-model-len": 2048, "served_model_name": "x", "api_key": "k"})
    assert config.max_model_len == 2048 and config.served_model_name == "x"
    assert settings.served_model_name == ["x"] and settings.api_key == "k"
    with pytest.raises(ValueError, match="unknown argument 'max_len'"):
        split_args({"max_len": 3})
