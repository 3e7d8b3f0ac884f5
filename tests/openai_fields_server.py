"""The live servers the vLLM-field tests talk to: one real engine on the bundled model (mp
backend, in this process), served by three apps on one event loop thread, each under uvicorn on
its own port so the official `openai` client can reach it:

- `vllm`: vLLM's optional flags on (prompt tokens details, X-Request-Id headers, /tokenizer_info,
  /load, CORS for one origin, a root path, request logging cut to 12 characters, two served names);
- `forced`: the flags that change every answer (force-include usage, tokens as token ids, a
  server chat template, another response role);
- `plain`: every flag at its default, to check what is off by default.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.fuzz_requests import LoopThread
from tests.server_fixtures import free_port

MODEL = "smol"
ORIGIN = "https://ok.example"
SERVER_TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[bot] {% endif %}")
SETTINGS = {
    "vllm": dict(served_model_name=[MODEL, "smol-alias"], enable_prompt_tokens_details=True,
                 enable_request_id_headers=True, enable_tokenizer_info_endpoint=True,
                 enable_server_load_tracking=True, allowed_origins=[ORIGIN], root_path="/prefix",
                 enable_log_requests=True, max_log_len=12),
    "forced": dict(served_model_name=[MODEL], enable_force_include_usage=True, return_tokens_as_token_ids=True,
                   chat_template=SERVER_TEMPLATE, response_role="bot"),
    "plain": dict(served_model_name=[MODEL]),
}


@dataclass
class FieldServers:
    urls: dict[str, str]
    tokenizer: object
    model_dir: str
    max_model_len: int

    def openai(self, name: str = "vllm"):
        import openai

        return openai.OpenAI(base_url=self.urls[name] + "/v1", api_key="none", max_retries=0, timeout=120)

    def post(self, path: str, name: str = "vllm", **kwargs) -> httpx.Response:
        return httpx.post(self.urls[name] + path, timeout=120, **kwargs)

    def get(self, path: str, name: str = "vllm", **kwargs) -> httpx.Response:
        return httpx.get(self.urls[name] + path, timeout=30, **kwargs)


@pytest.fixture(scope="session", name="field_servers")
def field_servers_fixture(smollm2_dir) -> FieldServers:
    """Import it into one test module only: each module importing it would start its own engine."""
    import uvicorn

    from strata.app.engines import start_engine
    from strata.app.model_source import load_tokenizer, preflight
    from strata.app.server.api import build_app
    from strata.app.server.settings import ServerSettings
    from strata.config import EngineConfig

    config = EngineConfig(distributed_executor_backend="mp", max_model_len=512, max_num_seqs=16)
    facts = preflight(config)
    tokenizer = load_tokenizer(facts)
    engine = start_engine(config, facts)
    servers, urls = [], {}
    with LoopThread() as lt:
        try:
            for name, settings in SETTINGS.items():
                app = build_app(engine, ServerSettings(**settings), tokenizer)
                port = free_port()
                server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                       root_path=settings.get("root_path") or ""))
                lt.submit(server.serve())
                servers.append(server)
                urls[name] = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while not all(s.started for s in servers) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield FieldServers(urls, tokenizer, smollm2_dir, config.max_model_len)
        finally:
            for s in servers:
                s.should_exit = True
            lt.run(asyncio.sleep(0.5))
            engine.shutdown()
