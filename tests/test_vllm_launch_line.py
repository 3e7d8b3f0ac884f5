"""A vLLM launch line, as vLLM's docs write it, starts a real `strata serve` (mp backend, the bundled
model) and serves the official openai client: every flag is taken with vLLM's meaning (underscore
spelling, the k suffix, half/float, a --config YAML of flags that the command line overrides), the
server reports the settings the flags asked for, and Ctrl-C stops it with exit 0. Flag by flag,
parsing only: tests/test_vllm_flags.py."""

from __future__ import annotations

import sys

import httpx
import pytest

from tests.server_fixtures import API_KEY, LiveServer, free_port, server_env, spawn, stop_process, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# vLLM's --config: flag names without their dashes. Its max-model-len loses to the command line's;
# max-num-seqs is taken (the server shows it nowhere), max-n shows as a 400 for n=3.
CONFIG_YAML = """\
served-model-name: smol-yaml
max-num-seqs: 8
max-n: 2
max-model-len: 4k
"""
MAX_TOKENS = 8


def test_a_vllm_launch_line_serves_the_bundled_model(smollm2_dir, tmp_path):
    import openai

    config = tmp_path / "serve.yaml"
    config.write_text(CONFIG_YAML)
    port, log = free_port(), tmp_path / "server.log"
    # As in vLLM's docs: `vllm serve MODEL --dtype ... --max_model_len 2k ... --config FILE`; 2k is 2000 (2K: 2048).
    launch = [smollm2_dir, "--dtype", "half", "--max_model_len", "2k", "--enable-chunked-prefill",
              "--no-enable-prefix-caching", "--trust-remote-code", "--generation-config", "auto",
              "--config", str(config), "--api-key", API_KEY,
              "--distributed-executor-backend", "mp", "--port", str(port)]
    proc = spawn([sys.executable, "-m", "strata.app.cli", "serve", *launch], server_env(None), log)
    server = LiveServer("mp", f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(server.url, proc, log)
        models = httpx.get(server.url + "/v1/models", headers=server.headers, timeout=30).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [("smol-yaml", 2000)]  # YAML name, CLI length
        client = server.openai(timeout=120)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model="smol-yaml", messages=messages, temperature=0,
                                             max_tokens=MAX_TOKENS)
        assert out.choices[0].message.content.strip(), out
        assert out.choices[0].finish_reason in ("stop", "length")
        assert 0 < out.usage.completion_tokens <= MAX_TOKENS
        with pytest.raises(openai.BadRequestError, match="n must be at most 2"):  # the YAML's max-n
            client.chat.completions.create(model="smol-yaml", messages=messages, n=3, max_tokens=1)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    for line in ("--trust-remote-code: accepted; it changes nothing",
                 "of float16 weights loaded",  # --dtype half (auto is float32 on CPU)
                 "Maximum concurrency for 2,000 tokens per request",
                 f"request defaults from {smollm2_dir}/generation_config.json: temperature=0.2, top_p=0.9",
                 f"Strata is serving smol-yaml at http://127.0.0.1:{port}"):
        assert line in text, f"{line!r} not in the log:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
