"""A dead driver costs no request on Ray: the engine started as the Serve ingress starts it (a
named, detached driver, supervised), a tiny model at tp 2, greedy and seeded requests streaming
while the driver actor's process (rank 0 + the engine) is SIGKILLed. The supervisor starts a new
driver in the same placement groups, once, and resubmits every request as prompt + delivered
tokens: each completes with the tokens of an undisturbed run, with no error. The same through
`strata serve` over HTTP: the streamed texts are those of an undisturbed run, and /health is 503
`recovering` meanwhile, 200 after."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
import time

import httpx
import pytest

from strata.app.engines import DRIVER_NAMESPACE, driver_actor_name, start_engine
from strata.engine_protocol import EngineRequest
from strata.sampling_params import SamplingParams
from tests.server_fixtures import free_port, server_env, spawn, stop_process, wait_healthy

pytestmark = pytest.mark.slow

PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34], [41, 42]]  # token ids of the tiny model


def _requests(tag: str) -> list[EngineRequest]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i} if i % 2 else {"temperature": 0.0}
        out.append(EngineRequest(f"{tag}-{i}", prompt, SamplingParams(max_tokens=48, ignore_eos=True, **seeded)))
    return out


async def _run(engine, requests, progress: list[float] | None = None) -> list[list[int]]:
    """Every request's tokens; `progress[i]`: the tokens request i has had, and when its last came."""

    async def one(i, request):
        tokens = []
        async for delta in engine.generate(request):
            tokens += delta.token_ids
            if progress is not None:
                progress[i] = (len(tokens), time.monotonic())
        return tokens

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


@pytest.mark.timeout(300)
def test_a_killed_driver_costs_no_request(tiny_models, ray_cluster):
    import ray

    from strata.app.model_source import preflight
    from strata.config import EngineConfig

    config = EngineConfig(model=tiny_models("qwen2"), tensor_parallel_size=2, distributed_executor_backend="ray",
                          max_model_len=512)
    engine = start_engine(config, preflight(config), driver_name=driver_actor_name("test", "driver-death"))
    try:
        expected = asyncio.run(_run(engine, _requests("ref")))
        pids = ray.get(engine.ray_engine.actor.rank_pids.remote())
        driver_pid = pids[0]  # rank 0 lives in the driver's process
        progress = [(0, 0.0)] * len(PROMPTS)

        async def disturbed():
            task = asyncio.ensure_future(_run(engine, _requests("run"), progress))
            while min(n for n, _ in progress) < 5:
                assert not task.done(), task.result()
                await asyncio.sleep(0.01)
            os.kill(driver_pid, signal.SIGKILL)
            killed = time.monotonic()
            at_kill = [n for n, _ in progress]
            while True:  # the first token after the kill: the streams go on
                moved = [t for (n, t), k in zip(progress, at_kill, strict=True) if n > k and t > killed]
                if moved or task.done():
                    break
                await asyncio.sleep(0.01)
            resumed_s = time.monotonic() - killed
            got = await task
            return got, resumed_s, time.monotonic() - killed

        got, resumed_s, done_s = asyncio.run(disturbed())
        health = asyncio.run(engine.health())
        print(f"Ray, SIGKILL of the driver: streams continued {resumed_s:.1f} s after the kill, every request "
              f"done at {done_s:.1f} s; {health}")
        assert got == expected
        assert engine.restarts == 1 and health.state == "serving" and health.recoveries == 1, health
        new_pids = ray.get(engine.ray_engine.actor.rank_pids.remote())
        assert new_pids[0] != driver_pid and new_pids[1] != pids[1]  # a new driver, with a new gang
        with pytest.raises(ProcessLookupError):
            os.kill(pids[1], 0)  # the old rank died with the driver that owned it
        assert asyncio.run(_run(engine, _requests("after"))) == expected  # and it serves new requests alike
    finally:
        engine.shutdown()


SERVED = "smol-driver-death"


def _body(i: int, stream: bool) -> dict:
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7 + i} if i % 2 else {"temperature": 0}
    return {"model": SERVED, "prompt": PROMPTS[i], "max_tokens": 48, "ignore_eos": True, "stream": stream,
            **seeded}


def _stream(url: str, i: int, out: list) -> None:
    """Request i streamed: out[i] becomes [text so far, events, error events]."""
    out[i] = ["", 0, []]
    with httpx.stream("POST", url + "/v1/completions", json=_body(i, True), timeout=180) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    out[i][2].append(event)
                else:
                    out[i][0] += event["choices"][0]["text"]
                out[i][1] += 1


def _driver_alive() -> bool:
    import ray

    try:
        ray.get_actor(driver_actor_name("strata", SERVED), namespace=DRIVER_NAMESPACE)
    except ValueError:
        return False
    return True


@pytest.mark.timeout(400)
def test_strata_serve_streams_on_through_a_driver_death(tiny_models, tmp_path, ray_cluster):
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", tiny_models("qwen2"), "--distributed-executor-backend",
           "ray", "-tp", "2", "--port", str(port), "--max-model-len", "512", "--served-model-name", SERVED,
           "--uvicorn-log-level", "warning", "--drain-timeout", "5"]
    proc = spawn(cmd, {**server_env(ray_cluster.get_runtime_context().gcs_address), "OMP_NUM_THREADS": "1"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        expected = [httpx.post(url + "/v1/completions", json=_body(i, False), timeout=120).json()["choices"][0]["text"]
                    for i in range(len(PROMPTS))]
        [driver_pid] = re.findall(r"rank 0 \(tp 0, pp 0, pid (\d+)\)", log.read_text())
        out: list = [None] * len(PROMPTS)
        streams = [threading.Thread(target=_stream, args=(url, i, out), daemon=True) for i in range(len(PROMPTS))]
        for t in streams:
            t.start()
        deadline = time.monotonic() + 60
        while not all(o is not None and o[1] >= 3 for o in out):
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.01)
        os.kill(int(driver_pid), signal.SIGKILL)
        killed = time.monotonic()
        health = []  # (status, state) of /health until it is 200 again
        while time.monotonic() - killed < 120:
            try:
                r = httpx.get(url + "/health", timeout=2)
                health.append((r.status_code, r.json().get("state")))
                if r.status_code == 200 and len(health) > 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        serving_s = time.monotonic() - killed
        for t in streams:
            t.join(120)
        print(f"strata serve, SIGKILL of the driver: /health 200 again after {serving_s:.1f} s; {health[:3]}...")
        assert (503, "recovering") in health and health[-1] == (200, "serving"), health
        assert [o[2] for o in out] == [[]] * len(PROMPTS), out
        assert [o[0] for o in out] == expected
        assert "the driver died" in log.read_text()
        stop_process(proc)
        assert proc.returncode == 0, log.read_text()[-4000:]
        deadline = time.monotonic() + 30
        while _driver_alive() and time.monotonic() < deadline:  # the new driver was stopped too
            time.sleep(0.5)
        assert not _driver_alive()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
