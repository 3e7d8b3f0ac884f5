"""DriverSupervisor on CPU, without Ray's processes: a fake RayEngine whose "driver" is an
EngineLoop over a fake executor, and whose death makes every open stream raise ActorDiedError.
Resubmitted requests (prompt + delivered tokens: EngineCore takes them as their output so far)
continue with the tokens of an undisturbed run; one restart serves every stream; health says
`recovering` meanwhile and new requests wait; past the budget every stream gets EngineDeadError.
A driver whose node left waits for room first (RayEngine.wait_for_room over a scripted cluster),
/health and /metrics saying what lacks, until a node has room or the shutdown. (On a real
two-node Ray: tests/test_driver_room.py.)
Also EngineCore's side alone: a resumed request's limits and what it is not sent again."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from strata.actors.engine.engine_loop import EngineLoop
from strata.app.engine_supervisor import DriverSupervisor, _without_repeats
from strata.app.engines import RayEngine
from strata.app.server.metrics import ServerMetrics
from strata.config import EngineConfig
from strata.engine_protocol import EngineDeadError, EngineRequest, RequestDelta, TokenLogprobs
from strata.placement import placement, room_wait
from strata.placement.placement import StagePlacement
from strata.placement.room_wait import NodeFree, StageNeed
from tests.engine_fakes import FakeExecutor, by_request, make_engine, request, run, tokens

NODE2 = "10.0.0.2"  # stage 0's node, the driver's
ROOM_REASON = ("waiting for room: stage 0 needs a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK; "
               f"it was on {NODE2}, which left the cluster); free now: 10.0.0.1 (head): 0 CPU")


@pytest.fixture(autouse=True)
def room(monkeypatch) -> threading.Event:
    """The cluster as a new driver's wait for room (placement/room_wait.py) sees it, scripted: set,
    every stage is placed; cleared, stage 0's node has left and the head has no CPU free."""
    room = threading.Event()
    room.set()
    monkeypatch.setattr(room_wait, "POLL_S", 0.01)
    monkeypatch.setattr(room_wait, "stage_needs", lambda groups, homes: [] if room.is_set() else
                        [StageNeed(0, [0], {"CPU": 1.0, "node:10.0.0.2": 0.001}, homes.get(0))])
    monkeypatch.setattr(room_wait, "free_now", lambda resource: [NodeFree("10.0.0.1", 0, is_head=True)])
    monkeypatch.setattr(placement, "homes_of", lambda groups: {0: NODE2})
    return room


def _engine_by_prompt():
    """An engine whose tokens depend on the prompt and position only, not on the seq ids a new
    driver hands out in another order."""
    executor = FakeExecutor()
    executor.token_for = lambda seq_id, n: 10 + (sum(executor.prompts[seq_id]) + 3 * n) % 50
    return make_engine(executor, max_model_len=256, num_blocks=256), executor


class FakeRayEngine:
    """What DriverSupervisor needs of a RayEngine; `kill` is the driver's SIGKILL. Its wait for
    room is RayEngine's own, over a StagePlacement of one stage (the `room` fixture's cluster)."""

    wait_for_room = RayEngine.wait_for_room

    def __init__(self, max_recoveries: int = 3, gate: threading.Event | None = None):
        self.config = EngineConfig(max_recoveries=max_recoveries)
        self.gate = gate  # restart_driver waits on it (a driver that takes a while to load)
        self.placement = StagePlacement("CPU", groups=[], tp_size=1, homes={0: NODE2})
        self._interrupt = threading.Event()  # set by the shutdown, as RayEngine's
        self.started: list[FakeExecutor] = []
        self.loop = self._new_loop()
        self.info = SimpleNamespace(num_blocks=256)
        self.dead: set[int] = set()
        self.shut = False

    def _new_loop(self) -> EngineLoop:
        core, executor = _engine_by_prompt()
        self.started.append(executor)
        return EngineLoop(core)

    def kill(self) -> None:
        self.dead.add(id(self.loop))
        self.loop.stop_loop()

    def restart_driver(self) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        self.loop = self._new_loop()

    async def generate(self, req: EngineRequest):
        loop = self.loop
        if id(loop) in self.dead:
            raise ActorDiedError()
        try:
            async for delta in loop.generate(req):
                if id(loop) in self.dead:
                    raise ActorDiedError()
                yield delta
        except RuntimeError:  # the loop was stopped under it
            raise ActorDiedError() from None

    async def abort(self, request_id: str) -> None:
        if id(self.loop) in self.dead:
            raise ActorDiedError()
        self.loop.abort(request_id)

    async def driver_health(self):
        if id(self.loop) in self.dead:
            raise ActorDiedError()
        return self.loop.health()

    def shutdown(self) -> None:
        self.shut = True
        self._interrupt.set()
        self.loop.stop_loop()


def _requests(tag: str) -> list[EngineRequest]:
    return [request(f"{tag}{i}", prompt_len=3 + i, max_tokens=30 + i, ignore_eos=True, min_tokens=10)
            for i in range(4)]


async def _stream_all(engine, requests, on_token=None) -> list[list[int]]:
    async def one(r):
        out = []
        async for delta in engine.generate(r):
            out += delta.token_ids
            if on_token is not None:
                on_token(r, out)
        return out

    return list(await asyncio.gather(*(one(r) for r in requests)))


def _undisturbed() -> list[list[int]]:
    fake = FakeRayEngine()
    try:
        return asyncio.run(_stream_all(fake, _requests("r")))
    finally:
        fake.shutdown()


def test_a_dead_driver_is_started_again_once_and_every_stream_continues_unchanged() -> None:
    expected = _undisturbed()
    fake = FakeRayEngine()
    supervisor = DriverSupervisor(fake)

    def kill_at_five(r, out):
        if r.request_id == "r0" and len(out) == 5 and not fake.dead:
            fake.kill()

    try:
        got = asyncio.run(_stream_all(supervisor, _requests("r"), kill_at_five))
        health = asyncio.run(supervisor.health())
    finally:
        supervisor.shutdown()
    assert got == expected
    assert supervisor.restarts == 1 and len(fake.started) == 2
    assert health.state == "serving" and health.recoveries == 1, health
    # The new driver was told each unfinished request once, with its prompt (outputs follow in the plan).
    new = fake.started[1]
    assert all(count == 1 for count in new.announcements.values())
    assert all(len(p) in (3, 4, 5, 6) for p in new.prompts.values())


def test_health_is_recovering_while_the_new_driver_starts_and_new_requests_wait() -> None:
    expected = _undisturbed()
    gate = threading.Event()
    fake = FakeRayEngine(gate=gate)
    supervisor = DriverSupervisor(fake)

    async def scenario():
        fake.kill()  # idle: a health poll notices
        assert (await supervisor.health()).state == "recovering"
        late = asyncio.ensure_future(_stream_all(supervisor, _requests("r")))
        await asyncio.sleep(0.2)
        health = await supervisor.health()
        assert health.state == "recovering" and "the driver died" in health.reason, health
        assert not late.done()
        gate.set()
        return await late

    try:
        assert asyncio.run(scenario()) == expected
        assert supervisor.restarts == 1
    finally:
        supervisor.shutdown()


def test_past_the_budget_every_stream_fails_stop() -> None:
    fake = FakeRayEngine(max_recoveries=1)
    supervisor = DriverSupervisor(fake)
    kills = 0

    def kill_twice(r, out):
        nonlocal kills
        if r.request_id == "r0" and len(out) in (5, 10) and kills < (1 if len(out) == 5 else 2):
            kills += 1
            fake.kill()

    try:
        with pytest.raises(EngineDeadError, match="persistent fault"):
            asyncio.run(_stream_all(supervisor, _requests("r"), kill_twice))
        health = asyncio.run(supervisor.health())
        assert health.state == "failed" and "more than 1 recoveries" in health.reason, health
        with pytest.raises(EngineDeadError):
            asyncio.run(_stream_all(supervisor, _requests("new")))
    finally:
        supervisor.shutdown()
    assert supervisor.restarts == 1 and fake.shut


def test_an_abort_while_the_driver_is_dead_ends_the_stream() -> None:
    gate = threading.Event()
    fake = FakeRayEngine(gate=gate)
    supervisor = DriverSupervisor(fake)

    async def scenario():
        deltas: list[RequestDelta] = []

        async def read():
            async for delta in supervisor.generate(request("a", max_tokens=200, ignore_eos=True)):
                deltas.append(delta)
                if len(deltas) == 3:
                    fake.kill()

        task = asyncio.ensure_future(read())
        while supervisor._restart is None:
            await asyncio.sleep(0.01)
        await supervisor.abort("a")
        gate.set()
        await task
        return deltas

    try:
        deltas = asyncio.run(scenario())
    finally:
        supervisor.shutdown()
    assert len(deltas) == 4 and deltas[-1].finish_reason == "abort"


async def _until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_new_driver_waits_for_room_saying_why_on_health_and_metrics_then_every_stream_continues(room) -> None:
    expected = _undisturbed()
    fake = FakeRayEngine()
    supervisor = DriverSupervisor(fake)
    metrics = ServerMetrics("m")

    def node_lost_at_five(r, out):
        if r.request_id == "r0" and len(out) == 5 and not fake.dead:
            room.clear()  # the driver died with its node: stage 0 is not placed
            fake.kill()

    async def scenario():
        streams = asyncio.ensure_future(_stream_all(supervisor, _requests("r"), node_lost_at_five))
        await _until(lambda: (supervisor._tracker.health.reason or "").startswith("waiting for room"))
        await asyncio.sleep(0.3)  # many polls of the cluster later: still waiting, nothing given up
        health = await supervisor.health()
        assert health.state == "recovering" and health.reason == ROOM_REASON, health
        metrics.update_stats(await supervisor.stats())
        assert f'reason="{ROOM_REASON}"' in metrics.render().decode()
        assert 'strata:engine_state{model_name="m",state="recovering"} 1.0' in metrics.render().decode()
        assert not streams.done() and len(fake.started) == 1  # no driver started meanwhile
        room.set()  # node 2 is back
        return await streams

    try:
        got = asyncio.run(scenario())
        health = asyncio.run(supervisor.health())
    finally:
        supervisor.shutdown()
    assert got == expected
    assert supervisor.restarts == 1 and len(fake.started) == 2
    assert health.state == "serving" and health.recoveries == 1, health


def test_the_shutdown_ends_a_new_drivers_wait_for_room_at_once(room) -> None:
    fake = FakeRayEngine()
    supervisor = DriverSupervisor(fake)

    async def scenario():
        room.clear()
        fake.kill()
        await supervisor.health()  # noticed: the restart starts
        late = asyncio.ensure_future(_stream_all(supervisor, _requests("r")))
        await _until(lambda: supervisor._tracker.health.reason == ROOM_REASON)
        started = time.monotonic()
        supervisor.shutdown()
        with pytest.raises(EngineDeadError, match="the engine was shut down"):
            await asyncio.wait_for(late, 5)
        return time.monotonic() - started

    took = asyncio.run(scenario())
    health = asyncio.run(supervisor.health())
    assert took < 2, took
    assert health.state == "failed" and health.reason == "the engine was shut down", health
    assert len(fake.started) == 1


# ---- EngineCore: a request resumed with its delivered tokens ----


def test_a_resumed_request_continues_where_the_first_engine_stopped() -> None:
    def once(resumed: list[int]) -> tuple[list[RequestDelta], FakeExecutor]:
        engine, executor = _engine_by_prompt()
        r = request("a", prompt_len=6, max_tokens=12, min_tokens=9, ignore_eos=True, prompt_logprobs=1)
        engine.add_request(EngineRequest(r.request_id, r.prompt_token_ids, r.params, resumed))
        return by_request(run(engine))["a"], executor

    full, _ = once([])
    assert sum(len(d.prompt_logprobs or []) for d in full) == 5
    delivered = tokens(full)[:5]
    rest, executor = once(delivered)
    assert tokens(rest) == tokens(full)[5:]  # max_tokens counts the delivered ones
    assert rest[-1].finish_reason == "length"
    assert all(d.prompt_logprobs is None for d in rest)  # the caller has them
    assert executor.prompts == {0: list(range(100, 106))}  # announced as its prompt; the outputs follow


def test_a_resumed_request_with_nothing_left_or_foreign_ids_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="nothing is left"):
        engine.add_request(EngineRequest("a", [1, 2], request("a", max_tokens=3).params, [5, 6, 7]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request(EngineRequest("b", [1, 2], request("b", max_tokens=9).params, [5, 10**6]))
    assert "a" not in engine and "b" not in engine


def test_a_resubmissions_deltas_lose_what_the_caller_has() -> None:
    lp = [TokenLogprobs(-1.0, 1) for _ in range(3)]
    delta, skip = _without_repeats(RequestDelta("a", prompt_logprobs=list(lp), queued_s=0.5), 5)
    assert delta is None and skip == 2
    delta, skip = _without_repeats(RequestDelta("a", [7], prompt_logprobs=list(lp), queued_s=0.5), 2)
    assert delta.prompt_logprobs == lp[2:] and delta.queued_s is None and skip == 0


def test_a_restarted_driver_with_its_kv_size_pinned_still_serves_the_config_asked_for() -> None:
    from strata.actors.gang import rebuild_config
    from strata.app.engines import same_engine

    asked = EngineConfig(max_model_len=512)
    assert same_engine(rebuild_config(asked, 77), asked)  # a new replica attaches to it
    assert not same_engine(rebuild_config(asked.model_copy(update={"max_model_len": 256}), 77), asked)
