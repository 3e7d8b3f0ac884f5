"""`serve run cluster/serve_config.yaml` deploys the same app as `strata serve`: through the
official openai client, its greedy chat answer is the offline LLM's."""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest
import yaml

from tests.server_fixtures import (
    CHAT_MESSAGES,
    MAX_TOKENS,
    REPO,
    free_port,
    server_env,
    spawn,
    stop_process,
    wait_healthy,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_serve_run_of_the_yaml_answers_as_the_offline_llm(server_ray_address, reference, tmp_path: Path):
    config = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # everything else exactly as shipped
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    serve = str(Path(sys.executable).with_name("serve"))
    proc = spawn([serve, "run", str(path)], server_env(server_ray_address), log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        text, token_ids = reference.chats[0]
        out = client.chat.completions.create(model=model, messages=CHAT_MESSAGES[0], max_tokens=MAX_TOKENS,
                                             temperature=0)
        assert out.choices[0].message.content == text
        assert out.usage.completion_tokens == len(token_ids)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
