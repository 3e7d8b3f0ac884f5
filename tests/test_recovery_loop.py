"""Recovery in the engine loop, on CPU with fake executors: a fault turns the engine `recovering`,
a rebuilt gang resumes every request (prompt + tokens so far) with the same tokens as an
undisturbed run, and too many faults in the window fail stop with EngineDeadError."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from strata.actors.engine.engine_health import Fault, HealthTracker
from strata.actors.engine.engine_loop import EngineLoop
from strata.engine_protocol import EngineDeadError
from tests.engine_fakes import FakeExecutor, make_engine, request


class GatedExecutor(FakeExecutor):
    """Waits at each submit until the test opens the gate (so a fault can arrive mid-stream)."""

    def __init__(self, gate: threading.Event | None = None, **kw):
        super().__init__(**kw)
        self.gate = gate

    def submit(self, plan):
        if self.gate is not None:
            self.gate.wait(10)
        return super().submit(plan)


async def _texts(loop: EngineLoop, requests) -> dict[str, list[int]]:
    async def one(r):
        return r.request_id, [t async for d in loop.generate(r) for t in d.token_ids]

    return dict(await asyncio.gather(*(one(r) for r in requests)))


def _requests():
    return [request(f"r{i}", prompt_len=3 + i, max_tokens=12 + i, ignore_eos=True) for i in range(4)]


def _undisturbed() -> dict[str, list[int]]:
    loop = EngineLoop(make_engine(max_model_len=256, num_blocks=256))
    try:
        return asyncio.run(_texts(loop, _requests()))
    finally:
        loop.stop_loop()


def test_a_failed_step_is_recovered_and_every_stream_continues_unchanged() -> None:
    expected = _undisturbed()
    rebuilt: list[FakeExecutor] = []

    def rebuild(fault: Fault) -> FakeExecutor:
        assert "injected step failure" in fault.reason
        rebuilt.append(FakeExecutor())
        rebuilt[-1].block_size = 4
        return rebuilt[-1]

    loop = EngineLoop(make_engine(FakeExecutor(fail_at=5), max_model_len=256, num_blocks=256), rebuild=rebuild)
    try:
        got = asyncio.run(_texts(loop, _requests()))
        health = loop.health()
    finally:
        loop.stop_loop()
    assert got == expected
    assert health.state == "serving" and health.recoveries == 1 and "injected" in health.reason
    # The new gang heard of every resumed request once, with its original prompt.
    new = rebuilt[0]
    assert all(count == 1 for count in new.announcements.values())
    assert sorted(len(p) for p in new.prompts.values()) == [3, 4, 5, 6]  # the prompts, not prompt + output


def test_a_reported_fault_turns_the_state_recovering_at_once_and_new_requests_wait() -> None:
    gate = threading.Event()
    release = threading.Event()

    def rebuild(fault: Fault) -> FakeExecutor:
        release.wait(10)
        executor = FakeExecutor()
        executor.block_size = 4
        return executor

    loop = EngineLoop(make_engine(GatedExecutor(gate), max_model_len=256, num_blocks=256), rebuild=rebuild)
    expected = _undisturbed()

    async def main():
        task = asyncio.ensure_future(_texts(loop, _requests()))
        await asyncio.sleep(0.2)
        assert loop.report_fault(Fault("rank 1 (pid 1) was killed by signal 9", 1))
        health = loop.health()
        assert (health.state, health.failed_rank) == ("recovering", 1)
        gate.set()  # the step in flight "raises" its way out: here it just ends, and recovery follows
        await asyncio.sleep(0.2)
        assert loop.health().state == "recovering"  # still rebuilding
        late = asyncio.ensure_future(_texts(loop, [request("late", max_tokens=5, ignore_eos=True)]))
        await asyncio.sleep(0.2)
        assert not late.done()  # it waits for the new gang rather than failing
        release.set()
        assert len((await late)["late"]) == 5
        return await task

    try:
        got = asyncio.run(main())
        assert got == expected
        assert loop.health().state == "serving" and loop.health().recoveries == 1
    finally:
        loop.stop_loop()


def test_too_many_faults_in_the_window_fail_stop_and_refuse_every_request() -> None:
    def rebuild(fault: Fault) -> FakeExecutor:
        executor = FakeExecutor(fail_at=None)
        executor.block_size = 4
        executor.submit = lambda plan: (_ for _ in ()).throw(RuntimeError("gloo: connection closed by peer"))
        return executor

    loop = EngineLoop(make_engine(FakeExecutor(fail_at=1), max_model_len=256, num_blocks=256, max_recoveries=2),
                      rebuild=rebuild)
    try:
        with pytest.raises(EngineDeadError, match="more than 2 recoveries within 600 s"):
            asyncio.run(_texts(loop, _requests()))
        health = loop.health()
        assert health.state == "failed" and health.recoveries == 2
        with pytest.raises(EngineDeadError, match="persistent fault"):
            asyncio.run(_texts(loop, [request("late")]))
        assert loop.health().state == "failed"
    finally:
        loop.stop_loop()


def test_the_budget_counts_only_recoveries_inside_the_window() -> None:
    now = [0.0]
    tracker = HealthTracker(max_recoveries=2, recovery_window_s=60, clock=lambda: now[0])
    assert tracker.may_recover() and tracker.may_recover()
    assert not tracker.may_recover()
    now[0] = 61.0
    assert tracker.may_recover()


def test_the_first_fault_wins_until_it_is_handled() -> None:
    tracker = HealthTracker(3, 600)
    assert tracker.report(Fault("rank 2 hung", 2))
    assert not tracker.report(Fault("engine step failed: connection reset"))
    assert tracker.take_fault() == Fault("rank 2 hung", 2)
    tracker.recovered()
    assert tracker.health.state == "serving" and tracker.health.reason == "rank 2 hung"
    started = time.monotonic()
    tracker.fail("gone", None)
    assert tracker.health.failed_rank == 2 and time.monotonic() - started < 1
