"""Fixtures for the HTTP server tests: a live `strata serve` subprocess per backend, the offline
`LLM`'s outputs to compare against, and, for in-process app tests, a fake `Engine` on CPU with a
tiny real tokenizer (one character per token).

Only one Ray runs at a time: the ray-backend server and `serve run` join the test process's Ray
(through RAY_ADDRESS), started here unless another fixture already started one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import pytest

from strata.engine_protocol import EngineInfo, EngineRequest, RequestDelta, TokenLogprobs

REPO = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MODEL_NAME = "smol"
MAX_N = 4
MAX_TOKENS_CAP = 1024
MAX_TOKENS = 24
COMPLETION_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
CHAT_MESSAGES = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]]
LONG_PROMPT, LONG_TOKENS = "Write a long story about the sea.", 64  # the request that runs beside bad ones


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout_s} s:\n{log.read_text()[-4000:]}")


def stop_process(proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Ctrl-C, as a user would; kill the process group only if it does not stop in time. The
    default is above the replica's own graceful-shutdown bound (drain 30 s + 30 s), with room for
    a loaded 2-core machine: a SIGKILL here leaves Serve state behind for the next test."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@dataclass
class LiveServer:
    backend: str
    url: str
    proc: subprocess.Popen
    log: Path
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {API_KEY}"})

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def async_openai(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.headers)
        return httpx.post(self.url + path, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed `name{labels}` (labels sorted, model_name left out)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=30).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
                samples[f"{s.name}{{{labels}}}"] = s.value
        return samples


@pytest.fixture(scope="session")
def server_ray_address() -> str:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def server_env(ray_address: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STRATA_API_KEY", "VLLM_API_KEY")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return env


@pytest.fixture(scope="module", params=["ray", "mp"])
def live_server(request, tmp_path_factory) -> LiveServer:
    """`strata serve` on the bundled model, one per backend, torn down (Ctrl-C) after the module."""
    backend = request.param
    address = request.getfixturevalue("server_ray_address") if backend == "ray" else None
    port = free_port()
    log = tmp_path_factory.mktemp(f"serve-{backend}") / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", "--distributed-executor-backend", backend,
           "--port", str(port), "--max-model-len", "2048", "--api-key", API_KEY, "--served-model-name", MODEL_NAME,
           "--max-n", str(MAX_N), "--max-tokens-cap", str(MAX_TOKENS_CAP), "--drain-timeout", "30"]
    proc = spawn(cmd, server_env(address), log)
    server = LiveServer(backend, f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(server.url, proc, log)
        yield server
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]


@dataclass
class Reference:
    """The offline LLM's greedy outputs, and the tokenizer, for the same prompts the tests send."""

    tokenizer: object
    completions: dict[str, tuple[str, list[int]]]
    chats: list[tuple[str, list[int]]]
    long: str


@pytest.fixture(scope="session")
def reference() -> Reference:
    """One batched greedy run of the offline LLM (mp backend, in this process) over every prompt."""
    from strata import LLM, SamplingParams

    llm = LLM(distributed_executor_backend="mp", max_model_len=2048)
    try:
        tok = llm.get_tokenizer()
        # Chat prompts exactly as LLM.chat builds them: the template's text, no special tokens added again.
        chats = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in CHAT_MESSAGES]
        prompts = [*COMPLETION_PROMPTS, *({"prompt": c, "prompt_token_ids": tok.encode(c, add_special_tokens=False)}
                                          for c in chats), LONG_PROMPT]
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        params = [greedy] * (len(prompts) - 1) + [SamplingParams(temperature=0.0, max_tokens=LONG_TOKENS,
                                                                 ignore_eos=True)]
        outs = [(o.outputs[0].text, o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]
        n = len(COMPLETION_PROMPTS)
        return Reference(tok, dict(zip(COMPLETION_PROMPTS, outs[:n], strict=True)), outs[n:-1], outs[-1][0])
    finally:
        llm.shutdown()


# ---- a fake engine for in-process app tests ----

LETTERS = "abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@cache
def char_tokenizer():
    """A real (transformers fast) tokenizer with one token per printable ASCII character: id 0 is
    <unk>, character c is ord(c) - 31. Decoding fuses tokens, so ids decode back to their text;
    the chat template writes `<role>content` per message."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def letter_id(letter: str) -> int:
    return ord(letter) - 31


class FakeEngine:
    """The `Engine` protocol on CPU, one token per step. A request's k-th token is the letter
    LETTERS[(seed + k) % 26] (seed 0 when unset: "abc..."), so the n completions of a seeded
    request differ. It refuses ids outside its vocabulary, as a real engine does, finishes on
    max_tokens ("length"; None means up to max_model_len) and on stop_token_ids ("stop"), and
    records every request it was sent and every one that was aborted (closing a stream before its
    last delta aborts, as does `abort`)."""

    def __init__(self, max_model_len: int = 64, vocab_size: int = 100, max_num_seqs: int = 4,
                 step_s: float = 0.0):
        self.info = EngineInfo(max_model_len=max_model_len, num_blocks=10, block_size=16,
                               max_num_seqs=max_num_seqs, max_logprobs=20, vocab_size=vocab_size,
                               ranks=[{"rank": 0}])
        self.step_s = step_s
        self.counters = {"num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0, "num_free_blocks": 10,
                         "num_blocks": 10, "prompt_tokens_total": 0, "generation_tokens_total": 0,
                         "num_preemptions_total": 0, "expert_load": None, "last_step_seconds": 0.01,
                         "step_host_overhead": [(1.0, 0.0004), (2.0, 0.0006)]}
        self.requests: list[EngineRequest] = []
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.refuse: str | None = None  # the ValueError message for the next requests, if set
        self.hang = False  # stats/health/step_times never answer
        self.healthy = True
        self.shut_down = False

    def _check(self, request: EngineRequest) -> None:
        if self.refuse is not None:
            raise ValueError(self.refuse)
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {self.info.vocab_size}).")
        assert request.params.n == 1, "the caller fans out n"

    @staticmethod
    def _logprobs(token: int, k: int | None) -> TokenLogprobs:
        alternatives = [(token, -0.5), *((letter_id(c), -2.0 - i) for i, c in enumerate("xyz"))]
        return TokenLogprobs(logprob=-0.5, rank=1, top=alternatives[:k or 0])

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestDelta]:
        self._check(request)  # before any delta
        rid, p, prompt = request.request_id, request.params, request.prompt_token_ids
        self.requests.append(request)
        self.running.add(rid)
        self.counters["prompt_tokens_total"] += len(prompt)
        limit = self.info.max_model_len - len(prompt)
        steps = min(p.max_tokens, limit) if p.max_tokens is not None else limit
        done = False
        try:
            for k in range(steps):
                await asyncio.sleep(self.step_s)
                if rid not in self.running:  # aborted
                    done = True
                    yield RequestDelta(rid, finish_reason="abort")
                    return
                token = letter_id(LETTERS[((p.seed or 0) + k) % 26])
                self.counters["generation_tokens_total"] += 1
                delta = RequestDelta(rid, [token])
                if p.logprobs is not None:
                    delta.logprobs = [self._logprobs(token, p.logprobs)]
                if k == 0 and p.prompt_logprobs is not None:
                    delta.prompt_logprobs = [self._logprobs(t, p.prompt_logprobs) for t in prompt[1:]]
                if token in (p.stop_token_ids or []) and k + 1 >= p.min_tokens:
                    delta.finish_reason, delta.stop_reason = "stop", token
                elif k + 1 == steps:
                    delta.finish_reason = "length"
                done = delta.finished
                yield delta
                if done:
                    return
        finally:
            if not done and rid in self.running:  # closed before its last delta
                self.aborted.append(rid)
            self.running.discard(rid)

    def generate_batch(self, requests: list[EngineRequest]) -> AsyncIterator[list[RequestDelta]]:
        raise NotImplementedError("offline only; the server never batches")

    async def abort(self, request_id: str) -> None:
        if request_id in self.running:
            self.running.discard(request_id)
            self.aborted.append(request_id)

    async def _answer(self) -> None:
        if self.hang:
            await asyncio.sleep(3600)

    async def stats(self) -> dict:
        await self._answer()
        return dict(self.counters)

    async def health(self) -> bool:
        await self._answer()
        return self.healthy

    async def step_times(self) -> list[list[tuple[float, float]]]:
        await self._answer()
        return [[(1.0, 1.02), (2.0, 2.01)]]

    def shutdown(self) -> None:
        self.shut_down = True


def sync(fn):
    """Runs an async test on a fresh event loop (no pytest-asyncio needed)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return run
