"""A dead rank costs no request on Ray: the bundled model at tp 3 (rank actors in the placement
group's bundles), greedy and seeded requests streaming through the driver actor while rank 1's
actor process is SIGKILLed. The driver rebuilds the gang in the same bundles and every request
completes with the tokens of an undisturbed run."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from strata import LLM, SamplingParams
from strata.engine_protocol import EngineRequest

PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):",
           "In the year 2050,"]


def _requests(tokenizer, tag: str) -> list[EngineRequest]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i} if i % 2 else {"temperature": 0.0}
        params = SamplingParams(max_tokens=32, ignore_eos=True, **seeded)
        out.append(EngineRequest(f"{tag}-{i}", tokenizer.encode(prompt), params))
    return out


async def _run(engine, requests, progress: list[int] | None = None) -> list[list[int]]:
    async def one(i, request):
        tokens = []
        async for delta in engine.generate(request):
            tokens += delta.token_ids
            if progress is not None:
                progress[i] += len(delta.token_ids)
        return tokens

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


@pytest.mark.timeout(900)
def test_a_killed_rank_actor_costs_no_request(ray_cluster):
    import ray

    with LLM(tensor_parallel_size=3, distributed_executor_backend="ray", max_model_len=512) as llm:
        engine = llm._engine  # the RayEngine: its streams, not the offline batch API
        tokenizer = llm.get_tokenizer()
        expected = asyncio.run(_run(engine, _requests(tokenizer, "ref")))
        pids = ray.get(engine.actor.rank_pids.remote())
        progress = [0] * len(PROMPTS)

        async def disturbed():
            task = asyncio.ensure_future(_run(engine, _requests(tokenizer, "run"), progress))
            while min(progress) < 3:
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            os.kill(pids[1], signal.SIGKILL)
            killed = time.monotonic()
            got = await task
            return got, time.monotonic() - killed

        got, seconds = asyncio.run(disturbed())
        health = asyncio.run(engine.health())
        print(f"Ray, SIGKILL of rank 1: every request done {seconds:.1f} s after the kill; {health}")
        assert got == expected
        assert health.state == "serving" and health.recoveries == 1 and health.failed_rank == 1, health
        new_pids = ray.get(engine.actor.rank_pids.remote())
        assert new_pids[0] == pids[0] and new_pids[1] != pids[1]  # the driver stayed; the ranks are new
