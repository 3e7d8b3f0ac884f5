"""`strata serve` exits non-zero after a fail-stop, so that its supervisor restarts it, on both
backends: a tiny model at tp 2 with --max-recoveries 0, a stream in flight, rank 1 SIGKILLed.
The stream ends with the engine's 503 error event, /health says 503 with the reason while the
process lingers, and the process exits with FAIL_STOP_EXIT_CODE within a bounded time, saying
why in its log."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time

import httpx
import pytest

from strata.app.server.fail_stop import FAIL_STOP_EXIT_CODE
from tests.server_fixtures import free_port, server_env, spawn, wait_healthy

pytestmark = pytest.mark.slow

PROMPT = [11, 12, 13, 14, 15]  # token ids: the tiny model's vocabulary is not the tokenizer's
EXIT_WITHIN_S = 30  # kill -> exit: fault found (< 1 s), linger 2 s, drain, Serve / engine stopped


def _serve(model: str, backend: str, tmp_path, ray_address: str | None):
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", model, "--distributed-executor-backend", backend,
           "-tp", "2", "--port", str(port), "--max-model-len", "4096", "--served-model-name", "smol-failstop",
           "--max-recoveries", "0", "--uvicorn-log-level", "warning"]
    proc = spawn(cmd, {**server_env(ray_address), "OMP_NUM_THREADS": "1"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return url, proc, log


def _stream(url: str, first: threading.Event, events: list[dict]) -> None:
    body = {"model": "smol-failstop", "prompt": PROMPT, "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
                first.set()


def _fail_and_watch(url: str, proc, log, rank1_pid) -> None:
    first, events = threading.Event(), []
    stream = threading.Thread(target=_stream, args=(url, first, events), daemon=True)
    stream.start()
    assert first.wait(60), log.read_text()[-3000:]
    pid = rank1_pid()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    seen = []  # (status, body) of /health until the process stops answering
    while proc.poll() is None and time.monotonic() - killed < EXIT_WITHIN_S:
        try:
            r = httpx.get(url + "/health", timeout=2)
            seen.append((r.status_code, r.json() if r.headers.get("content-type") == "application/json" else {}))
        except httpx.HTTPError:  # the listener is gone
            pass
        time.sleep(0.1)
    rc = proc.wait(max(1.0, EXIT_WITHIN_S - (time.monotonic() - killed)))
    took = time.monotonic() - killed
    print(f"{len(seen)} /health answers; kill -> exit {rc} in {took:.1f} s")
    text = log.read_text()
    assert rc == FAIL_STOP_EXIT_CODE, text[-4000:]
    failed = [body for status, body in seen if status == 503 and body.get("state") == "failed"]
    assert failed and "persistent fault" in failed[0]["reason"] and failed[0]["failed_rank"] == 1, seen[-10:]
    stream.join(30)
    assert events and events[-1].get("error", {}).get("code") == 503, events[-2:]
    assert "failed stop" in events[-1]["error"]["message"] or "failed" in events[-1]["error"]["message"]
    assert f"exits with status {FAIL_STOP_EXIT_CODE}" in text, text[-4000:]


def _rank_pid_from_log(log, rank: int) -> int:
    found = re.findall(rf"rank {rank} \(tp \d+, pp \d+, pid (\d+)\)", log.read_text())
    assert found, log.read_text()[-3000:]
    return int(found[-1])


@pytest.fixture(scope="module")
def tiny_model(tiny_models) -> str:
    return tiny_models("qwen2", max_position_embeddings=4096)


@pytest.mark.timeout(300)
def test_a_fail_stop_exits_non_zero_mp(tiny_model, tmp_path):
    url, proc, log = _serve(tiny_model, "mp", tmp_path, None)
    try:
        _fail_and_watch(url, proc, log, lambda: _rank_pid_from_log(log, 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_a_fail_stop_exits_non_zero_ray(tiny_model, tmp_path, ray_cluster):
    from ray._private.state import actors

    def rank1_pid() -> int:
        pids = [a["Pid"] for a in actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == "RankWorker"]
        assert len(pids) == 1, pids  # tp 2: rank 0 is the driver's; one rank actor
        return pids[0]

    url, proc, log = _serve(tiny_model, "ray", tmp_path, ray_cluster.get_runtime_context().gcs_address)
    try:
        _fail_and_watch(url, proc, log, rank1_pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
