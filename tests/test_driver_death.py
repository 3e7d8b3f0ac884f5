"""A dead driver costs no request on Ray: the engine started as the Serve ingress starts it (a
named, detached driver, supervised), a tiny model at tp 2, greedy and seeded requests streaming
while the driver actor's process (rank 0 + the engine) is SIGKILLed. The supervisor starts a new
driver in the same placement groups, once, and resubmits every request as prompt + delivered
tokens: each completes with the tokens of an undisturbed run, with no error."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from strata.app.engines import driver_actor_name, start_engine
from strata.engine_protocol import EngineRequest
from strata.sampling_params import SamplingParams

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
