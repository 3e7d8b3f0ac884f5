"""vLLM's launch lines under `strata serve` (parsing only: nothing starts), and the model's request
defaults (vLLM's --generation-config) in the offline LLM over a fake engine.

Every vLLM flag Strata takes is either honoured with vLLM's meaning or, for a value Strata does
not run, refused naming the flag and what Strata does instead; `--config` YAML, size suffixes and
underscore spellings parse as in vLLM."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from strata.app.serve_cli import FlagError
from strata.app.server.settings import ServerSettings
from strata.app.vllm_flags import human_readable_int
from strata.config import EngineConfig
from strata.engine_protocol import EngineInfo, EngineRequest, RequestDelta
from strata.sampling_params import SamplingParams


def _serve_args(*argv: str) -> argparse.Namespace:
    from strata.app.serve_cli import add_serve_parser

    parser = argparse.ArgumentParser(prog="strata")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def _configs(*argv: str) -> tuple[EngineConfig, ServerSettings]:
    from strata.app.serve_cli import configs_from_args

    return configs_from_args(_serve_args(*argv))


@pytest.fixture
def no_key_env(monkeypatch):
    for name in ("STRATA_API_KEY", "VLLM_API_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


# ---- a launch line from vLLM's docs ----

def test_a_vllm_launch_line_builds_the_expected_configs(smollm2_dir, no_key_env):
    config, settings = _configs(smollm2_dir, "--dtype", "half", "--max-model-len", "2k", "--enable-chunked-prefill",
                                "--no-enable-prefix-caching", "-tp", "1", "--api-key", "KEY")
    assert config == EngineConfig(model=smollm2_dir, dtype="float16", max_model_len=2000, tensor_parallel_size=1,
                                  distributed_executor_backend="ray")
    assert settings == ServerSettings(api_key="KEY")


# ---- flags accepted with their meaning ----

@pytest.mark.parametrize("argv, field, value", [
    (["--dtype", "half"], "dtype", "float16"),
    (["--dtype", "float"], "dtype", "float32"),
    (["--dtype", "bfloat16"], "dtype", "bfloat16"),
    (["--max-model-len", "4k"], "max_model_len", 4000),
    (["--max-model-len", "4K"], "max_model_len", 4096),
    (["--max-model-len", "25.6k"], "max_model_len", 25600),
    (["--max-model-len", "1m"], "max_model_len", 1_000_000),
    (["--max-model-len", "1M"], "max_model_len", 1 << 20),
    (["--max-model-len", "8192"], "max_model_len", 8192),
])
def test_vllm_values_mean_what_they_mean_in_vllm(argv, field, value, no_key_env):
    config, _ = _configs(*argv)
    assert getattr(config, field) == value


@pytest.mark.parametrize("text", ["1.5K", "4x", "k", ""])
def test_bad_sizes_are_argparse_errors(text, capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        human_readable_int(text)
    with pytest.raises(SystemExit) as exit_info:
        _serve_args("--max-model-len", text)
    assert exit_info.value.code == 2 and "--max-model-len" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--enable-chunked-prefill"], ["--no-enable-prefix-caching"], ["--kv-cache-dtype", "auto"], ["-dp", "1"],
    ["--data-parallel-size", "1"], ["--trust-remote-code"],
])
def test_flags_whose_value_is_what_strata_does_change_nothing(argv, no_key_env):
    assert _configs(*argv) == _configs()


def test_trust_remote_code_says_it_changes_nothing(caplog, no_key_env):
    with caplog.at_level("INFO", logger="strata"):
        _configs("--trust-remote-code")
    assert "--trust-remote-code: accepted; it changes nothing" in caplog.text


def test_generation_config_reaches_the_server_settings(tmp_path, no_key_env):
    assert _configs()[1].generation_config == "auto"
    assert _configs("--generation-config", "vllm")[1].generation_config == "vllm"
    (tmp_path / "generation_config.json").write_text("{}")
    assert _configs("--generation-config", str(tmp_path))[1].generation_config == str(tmp_path)
    with pytest.raises(FlagError, match="--generation-config .*no generation_config.json"):
        _configs("--generation-config", str(tmp_path / "missing"))


# ---- flags refused, naming the flag and what Strata does instead ----

@pytest.mark.parametrize("argv, says", [
    (["--enable-prefix-caching"], "--enable-prefix-caching: Strata has no prefix caching"),
    (["--no-enable-chunked-prefill"], "--no-enable-chunked-prefill: Strata always prefills long prompts in chunks"),
    (["--quantization", "awq"], "--quantization awq: Strata runs unquantised weights only"),
    (["-q", "fp8"], "--quantization fp8: Strata runs unquantised weights only"),
    (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: Strata keeps the KV cache in the model's dtype"),
    (["-dp", "2"], "--data-parallel-size 2: Strata runs one engine"),
])
def test_flags_with_values_strata_does_not_run_are_refused(argv, says, capsys, no_key_env):
    with pytest.raises(FlagError, match=says):
        _configs(*argv)
    args = _serve_args(*argv)
    assert args.func(args) == 2  # before anything starts
    assert says in capsys.readouterr().err


def test_every_refusal_is_reported_at_once(no_key_env):
    with pytest.raises(FlagError) as err:
        _configs("--quantization", "awq", "--enable-prefix-caching")
    assert "--quantization awq" in str(err.value) and "--enable-prefix-caching" in str(err.value)


def test_bench_takes_the_same_flags_with_the_same_meaning(capsys):
    from strata.app.bench.engine_args import engine_config
    from strata.app.cli import build_parser, main

    args = build_parser().parse_args(["bench", "latency", "--model", "m", "--dtype", "half", "--max-model-len", "4K",
                                      "--no-enable-prefix-caching", "--distributed-executor-backend", "mp"])
    config = engine_config(args)
    assert (config.dtype, config.max_model_len) == ("float16", 4096)
    assert main(["bench", "latency", "--model", "m", "--quantization", "awq"]) == 2
    assert "--quantization awq" in capsys.readouterr().err


# ---- spellings: underscores and --config ----

def test_underscore_spellings_are_the_dashed_flags(no_key_env):
    dashed = _configs("m", "--max-model-len", "4k", "--tensor-parallel-size", "2", "--served-model-name", "a_b",
                      "--no-enable-prefix-caching", "--gpu-memory-utilization=0.5")
    underscored = _configs("m", "--max_model_len", "4k", "--tensor_parallel_size", "2", "--served_model_name", "a_b",
                           "--no_enable_prefix_caching", "--gpu_memory_utilization=0.5")
    assert underscored == dashed and dashed[1].served_model_name == ["a_b"]  # values keep their underscores


def _yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_config_yaml_holds_flags_and_the_command_line_wins(tmp_path, no_key_env):
    path = _yaml(tmp_path, "model: from-yaml\nmax-model-len: 4k\ntensor_parallel_size: 2\nenforce-eager: true\n"
                           "enable-prefix-caching: false\nskip-tokenizer-init: false\nserved-model-name: [a, b]\n"
                           "port: 9001\napi-key: yaml-key\n")
    config, settings = _configs("--config", path)
    assert (config.model, config.max_model_len, config.tensor_parallel_size) == ("from-yaml", 4000, 2)
    assert config.enforce_eager and not config.skip_tokenizer_init
    assert (settings.served_model_name, settings.port, settings.api_key) == (["a", "b"], 9001, "yaml-key")
    # Flags on the command line win, before or after --config; MODEL wins over the file's model.
    config, settings = _configs("cli-model", "--port", "9002", f"--config={path}", "-tp", "1")
    assert (config.model, config.tensor_parallel_size, settings.port) == ("cli-model", 1, 9002)


@pytest.mark.parametrize("text, name, says", [
    ("max_len: 3\n", "c.yaml", "'max_len' is not a flag"),
    ("- a\n- b\n", "c.yaml", "expected a mapping"),
    ("port: [\n", "c.yaml", "--config"),
    ("port: 1\n", "c.json", "expected a YAML file"),
    ("config: other.yaml\n", "c.yaml", "'config' is not a flag"),
])
def test_bad_config_files_are_argparse_errors_naming_the_file(tmp_path, text, name, says, capsys):
    path = _yaml(tmp_path, text, name)
    with pytest.raises(SystemExit) as exit_info:
        _serve_args("--config", path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and says in err and path in err


def test_a_missing_config_file_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _serve_args("--config", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in capsys.readouterr().err


def test_a_refused_value_in_a_config_file_is_refused_too(tmp_path, no_key_env):
    with pytest.raises(FlagError, match="--enable-prefix-caching: Strata has no prefix caching"):
        _configs("--config", _yaml(tmp_path, "enable-prefix-caching: true\n"))


# ---- the offline LLM takes vLLM's keywords the same way ----

def test_llm_refuses_vllm_keywords_before_anything_starts(monkeypatch):
    import strata.app.llm as llm_module

    monkeypatch.setattr(llm_module, "preflight", lambda config: pytest.fail("nothing may start"))
    with pytest.raises(ValueError, match="quantization='awq': Strata runs unquantised weights only"):
        llm_module.LLM(quantization="awq")
    with pytest.raises(ValueError, match="enable_prefix_caching=True"):
        llm_module.LLM(enable_prefix_caching=True)


# ---- the model's request defaults (--generation-config) ----

def _generation_config(folder: Path, **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(values))
    return folder


def test_generation_defaults_are_the_files_sampling_fields(tmp_path):
    from strata.app.model_source import generation_defaults

    folder = _generation_config(tmp_path / "m", do_sample=True, temperature=0.6, top_p=0.95, top_k=20, min_p=0.05,
                                repetition_penalty=1.1, max_new_tokens=100, bos_token_id=1, eos_token_id=[2, 3])
    expected = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                "max_tokens": 100}
    assert generation_defaults(str(folder)) == expected
    assert generation_defaults(str(folder), "vllm") == {}
    assert generation_defaults(str(tmp_path), str(folder)) == expected  # another folder's file
    assert generation_defaults(str(tmp_path)) == {}  # auto, and the model has none
    with pytest.raises(ValueError, match="no generation_config.json"):
        generation_defaults(str(folder), str(tmp_path))
    bad = _generation_config(tmp_path / "bad", top_p=2.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generation_defaults(str(bad))


def _linked_copy(source: str, target: Path) -> Path:
    """The model at `source` under `target`, its files linked (no copies), but for its
    generation_config.json: a test writes its own, never through a link into the shared cache."""
    target.mkdir()
    for name in os.listdir(source):
        if name != "generation_config.json":
            (target / name).symlink_to(Path(source) / name)
    return target


@pytest.fixture
def bundled_copy(tmp_path, monkeypatch, smollm2_dir) -> Path:
    """A fresh bundled-model directory (STRATA_BUNDLED_MODEL_DIR) without a generation_config.json,
    so the one Strata adds to it lands here, not in the shared cache."""
    copy = _linked_copy(smollm2_dir, tmp_path / "bundled")
    monkeypatch.setenv("STRATA_BUNDLED_MODEL_DIR", str(copy))
    return copy


class RecordingEngine:
    """The offline side of the Engine protocol: records every request, answers each with one token."""

    def __init__(self) -> None:
        self.info = EngineInfo(max_model_len=256, num_blocks=16, block_size=16, max_num_seqs=8, max_logprobs=20,
                               vocab_size=49152, ranks=[{"rank": 0}])
        self.requests: list[EngineRequest] = []

    async def generate_batch(self, requests: list[EngineRequest]):
        self.requests += requests
        yield [RequestDelta(r.request_id, token_ids=[42], finish_reason="length") for r in requests]

    def shutdown(self) -> None:
        pass


@pytest.fixture
def offline_llm(monkeypatch):
    """LLM(...) over a RecordingEngine; shut down after the test."""
    import strata.app.llm as llm_module

    made = []

    def build(*args, **kwargs):
        engine = RecordingEngine()
        monkeypatch.setattr(llm_module, "start_engine", lambda config, facts: engine)
        llm = llm_module.LLM(*args, **kwargs)
        made.append(llm)
        return llm, engine

    yield build
    for llm in made:
        llm.shutdown()


def test_the_bundled_model_samples_with_its_generation_config(bundled_copy, offline_llm):
    llm, engine = offline_llm()  # the bundled model
    written = json.loads((bundled_copy / "generation_config.json").read_text())
    assert {"temperature": written["temperature"], "top_p": written["top_p"]} == {"temperature": 0.2, "top_p": 0.9}
    llm.generate("The capital of France is", use_tqdm=False)
    llm.chat([{"role": "user", "content": "Say hello"}], use_tqdm=False)
    for request in engine.requests:
        p = request.params
        assert (p.temperature, p.top_p) == (written["temperature"], written["top_p"])
        assert (p.top_k, p.min_p, p.max_tokens) == (0, 0.0, 16)  # the file leaves the rest to SamplingParams
    engine.requests.clear()
    llm.generate("Hi", SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    llm.generate("Hi", SamplingParams(temperature=0.7), use_tqdm=False)
    assert [(r.params.temperature, r.params.top_p) for r in engine.requests] == [(0.0, 1.0), (0.7, 1.0)]


def test_a_models_generation_config_and_the_ways_to_turn_it_off(tmp_path, smollm2_dir, offline_llm, caplog):
    model = _generation_config(_linked_copy(smollm2_dir, tmp_path / "model"), temperature=0.6, top_k=20,
                               repetition_penalty=1.05, max_new_tokens=7)
    with caplog.at_level("INFO", logger="strata"):
        llm, engine = offline_llm(str(model))
    assert "request defaults from" in caplog.text and "temperature=0.6" in caplog.text  # logged at start
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.6, top_k=20, repetition_penalty=1.05,
                                                               max_tokens=7)
    llm.generate([[1, 2, 3]], use_tqdm=False)
    assert engine.requests[-1].params.max_tokens == 7 and engine.requests[-1].params.top_k == 20
    plain, _ = offline_llm(str(model), generation_config="vllm")
    assert plain.get_default_sampling_params() == SamplingParams()
    other = _generation_config(tmp_path / "elsewhere", temperature=0.3)
    assert offline_llm(str(model), generation_config=str(other))[0].default_sampling_params == {"temperature": 0.3}


def test_the_server_settings_carry_the_defaults_for_the_server(tmp_path, smollm2_dir):
    from strata.model_facts import ModelFacts

    model = _generation_config(tmp_path / "m", temperature=0.6, top_p=0.9)
    facts = ModelFacts(model_dir=str(model), tokenizer_dir=None, served_name="m", architecture="LlamaForCausalLM",
                       num_layers=1, layer_partition=(1,), eos_token_ids=(2,), vocab_size=10,
                       max_position_embeddings=64)
    settings = ServerSettings(api_key=None)
    done = settings.for_model(facts)
    assert settings.default_sampling_params is None  # filled in a copy
    assert done.default_sampling_params == {"temperature": 0.6, "top_p": 0.9} and done.served_model_name == ["m"]
    assert ServerSettings(api_key=None, generation_config="vllm").for_model(facts).default_sampling_params == {}
    given = ServerSettings(api_key=None, default_sampling_params={"temperature": 0.1})
    assert given.for_model(facts).default_sampling_params == {"temperature": 0.1}  # as given, not re-read
    # The Serve replica gets them with the settings.
    assert ServerSettings.model_validate(done.model_dump()) == done
