"""EngineLoop (the driver's engine thread and request streams) with a fake executor, and the
Engine protocol as app/engines.py implements it."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from strata.actors.engine.engine_loop import EngineLoop
from strata.app.engines import LocalEngine, RayEngine
from strata.engine_protocol import Engine, EngineInfo, RequestDelta
from tests.engine_fakes import FakeExecutor, make_engine, request


class SlowExecutor(FakeExecutor):
    """One millisecond per step, so a consumer can leave while its request is still running."""

    def submit(self, plan):
        time.sleep(0.001)
        return super().submit(plan)


@pytest.fixture
def loop_of():
    loops: list[EngineLoop] = []

    def make(executor: FakeExecutor | None = None, **engine_kw) -> EngineLoop:
        engine_kw.setdefault("max_model_len", 4096)
        engine_kw.setdefault("num_blocks", 1024)
        loops.append(EngineLoop(make_engine(executor, **engine_kw)))
        return loops[-1]

    yield make
    for loop in loops:
        loop.stop_loop()


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def _collect(stream) -> list:
    return [item async for item in stream]


def test_generate_streams_deltas_until_the_final_one(loop_of) -> None:
    loop = loop_of()
    deltas = asyncio.run(_collect(loop.generate(request("a", max_tokens=5))))
    assert [len(d.token_ids) for d in deltas] == [1] * 5
    assert deltas[-1].finish_reason == "length" and not any(d.finished for d in deltas[:-1])
    assert loop.health().state == "serving"


def test_a_refused_request_raises_before_any_delta(loop_of) -> None:
    loop = loop_of(SlowExecutor())  # the first "dup" is still running when the second arrives
    with pytest.raises(ValueError, match="n=3"):
        asyncio.run(_collect(loop.generate(request("a", n=3))))

    async def duplicate() -> list[RequestDelta]:
        first = loop.generate(request("dup", max_tokens=200, ignore_eos=True))
        first_delta = await first.__anext__()
        with pytest.raises(ValueError, match="already running"):
            await _collect(loop.generate(request("dup")))
        return [first_delta, *await _collect(first)]  # the refused one did not abort the first

    deltas = asyncio.run(duplicate())
    assert len(deltas) == 200 and deltas[-1].finish_reason == "length"


def test_a_consumer_that_leaves_aborts_its_request(loop_of) -> None:
    loop = loop_of(SlowExecutor())
    engine = loop.engine

    async def leave_after_two() -> None:
        stream = loop.generate(request("a", max_tokens=4000, ignore_eos=True))
        async for delta in stream:
            if len(delta.token_ids) and engine.num_generation_tokens >= 2:
                break
        await stream.aclose()

    asyncio.run(leave_after_two())
    _wait_for(lambda: not engine.has_unfinished())
    assert engine.num_generation_tokens < 4000
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_all_ends_every_request_in_flight(loop_of) -> None:
    """What a Serve replica asks of the driver it attaches to: the dead replica's requests end."""
    loop = loop_of(SlowExecutor())
    engine = loop.engine

    async def two_then_abort_all() -> list[list[RequestDelta]]:
        streams = [loop.generate(request(f"r{i}", max_tokens=4000, ignore_eos=True)) for i in range(2)]
        firsts = [await s.__anext__() for s in streams]
        loop.abort_all()
        return [[first, *await _collect(s)] for first, s in zip(firsts, streams, strict=True)]

    for deltas in asyncio.run(two_then_abort_all()):
        assert deltas[-1].finish_reason == "abort" and len(deltas) < 4000
    _wait_for(lambda: not engine.has_unfinished())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_generate_batch_yields_one_list_per_step_until_all_finish(loop_of) -> None:
    loop = loop_of()
    reqs = [request(f"r{i}", max_tokens=2 + i) for i in range(3)]
    steps = asyncio.run(_collect(loop.generate_batch(reqs)))
    assert len(steps) == 4  # r2 needs 4 decode steps; all three prefill together
    assert [[d.request_id for d in s] for s in steps] == [["r0", "r1", "r2"], ["r0", "r1", "r2"],
                                                          ["r1", "r2"], ["r2"]]
    finals = {d.request_id: d.finish_reason for s in steps for d in s if d.finished}
    assert finals == {"r0": "length", "r1": "length", "r2": "length"}


def test_generate_batch_validates_everything_before_queueing(loop_of) -> None:
    loop = loop_of()
    with pytest.raises(ValueError, match=r"^prompt 1: The prompt has 5000 tokens"):
        asyncio.run(_collect(loop.generate_batch([request("ok"), request("bad", prompt_len=5000)])))
    with pytest.raises(ValueError, match=r"^prompt 1: request_id 'x' is already running"):
        asyncio.run(_collect(loop.generate_batch([request("x"), request("x")])))
    time.sleep(0.2)  # the engine thread would have taken any queued request by now
    assert loop.engine.stats()["prompt_tokens_total"] == 0


def test_leaving_a_batch_early_aborts_the_unfinished(loop_of) -> None:
    loop = loop_of(SlowExecutor())
    engine = loop.engine

    async def first_step_only() -> list[RequestDelta]:
        stream = loop.generate_batch([request(f"r{i}", max_tokens=4000, ignore_eos=True) for i in range(3)])
        step = await stream.__anext__()
        await stream.aclose()
        return step

    assert len(asyncio.run(first_step_only())) == 3
    _wait_for(lambda: not engine.has_unfinished())
    assert engine.num_generation_tokens < 3 * 4000
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_failing_step_fails_the_streams_and_the_health(loop_of) -> None:
    loop = loop_of(FakeExecutor(fail_at=2))
    with pytest.raises(RuntimeError, match="engine step failed: injected step failure"):
        asyncio.run(_collect(loop.generate(request("a", max_tokens=10))))
    assert loop.health().state == "failed"  # no gang to rebuild: fail-stop
    assert not loop.engine.has_unfinished()


def test_stopping_the_loop_fails_open_streams(loop_of) -> None:
    loop = loop_of(SlowExecutor())

    async def main() -> None:
        stream = loop.generate(request("a", max_tokens=4000, ignore_eos=True))
        await stream.__anext__()
        await asyncio.to_thread(loop.stop_loop)
        with pytest.raises(RuntimeError, match="shut down"):
            await _collect(stream)

    asyncio.run(main())
    assert loop.health().state == "failed"


# ---- app/engines.py ----

_PROTOCOL_METHODS = ("generate", "generate_batch", "abort", "stats", "health", "step_times", "shutdown")


@pytest.mark.parametrize("cls", [RayEngine, LocalEngine])
def test_engines_implement_the_protocol(cls) -> None:
    for name in _PROTOCOL_METHODS:
        want, got = getattr(Engine, name), getattr(cls, name)
        assert inspect.signature(got).parameters.keys() == inspect.signature(want).parameters.keys(), name
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
    for old in ("call", "stream", "acall", "astream"):
        assert not hasattr(cls, old)


def test_local_engine_runs_the_driver_on_the_callers_loop(loop_of) -> None:
    loop = loop_of()
    engine = LocalEngine.__new__(LocalEngine)  # the driver's engine loop, without ranks
    engine.driver = loop
    engine.info = EngineInfo(max_model_len=4096, num_blocks=1024, block_size=4, max_num_seqs=256,
                             max_logprobs=20, vocab_size=1000)

    async def main() -> None:
        deltas = await _collect(engine.generate(request("a", max_tokens=3)))
        assert [d.finish_reason for d in deltas] == [None, None, "length"]
        steps = await _collect(engine.generate_batch([request("b", max_tokens=2), request("c", max_tokens=1)]))
        assert sum(len(s) for s in steps) == 3
        assert (await engine.health()).state == "serving"
        assert (await engine.stats())["generation_tokens_total"] == 6
        await engine.abort("unknown")

    asyncio.run(main())
