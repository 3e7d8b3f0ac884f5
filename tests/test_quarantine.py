"""A poisoned request fails alone (actors/engine/quarantine.py): on CPU with fake executors whose
step raises whenever a request carrying the poison token is in it. The engine rebuilds, runs the
suspects one at a time, fails the poisoned one with RequestFaultError and finishes every other
request with the tokens of an undisturbed run, within the recovery budget."""

from __future__ import annotations

import asyncio

import pytest

from strata.actors.engine.engine_health import Fault
from strata.actors.engine.engine_loop import EngineLoop
from strata.actors.engine.quarantine import Quarantine
from strata.engine_protocol import EngineRequest, RequestDelta, RequestFaultError
from strata.sampling_params import SamplingParams
from tests.engine_fakes import FakeExecutor, make_engine

POISON = 377  # inside the tiny models' vocabulary (512)


class PoisonExecutor(FakeExecutor):
    """Raises at any step that schedules a sequence whose prompt holds POISON."""

    def __init__(self) -> None:
        super().__init__()
        self.poisoned: set[int] = set()

    def submit(self, plan):
        for new in plan.new_sequences:
            if POISON in new.prompt_token_ids.tolist():
                self.poisoned.add(new.seq_id)
        if self.poisoned & set(plan.seq_ids.tolist()):
            raise RuntimeError("injected: CUDA error: an illegal memory access was encountered")
        return super().submit(plan)


def _request(request_id: str, poisoned: bool = False, n: int = 10) -> EngineRequest:
    prompt = [100, POISON, 102] if poisoned else [100 + len(request_id), 101, 102]
    return EngineRequest(request_id, prompt, SamplingParams(max_tokens=n, ignore_eos=True))


async def _outcomes(loop: EngineLoop, requests) -> dict[str, list[int] | BaseException]:
    async def one(r):
        try:
            return r.request_id, [t async for d in loop.generate(r) for t in d.token_ids]
        except Exception as err:  # noqa: BLE001 - the outcome under test
            return r.request_id, err

    return dict(await asyncio.gather(*(one(r) for r in requests)))


def _run_all(executor: FakeExecutor, first: list[EngineRequest], then: list[EngineRequest], rebuild=None):
    loop = EngineLoop(make_engine(executor, max_model_len=256, num_blocks=256), rebuild=rebuild)
    try:
        return asyncio.run(_outcomes(loop, first)), asyncio.run(_outcomes(loop, then)), loop, loop.health()
    finally:
        loop.stop_loop()


def test_a_poisoned_request_fails_alone_and_the_others_finish_unchanged() -> None:
    good = [_request(f"r{i}", n=8 + i) for i in range(4)]
    late = [_request("r9", n=3)]
    # The fake's tokens depend on a sequence's id: the reference has a harmless request in "bad"'s place.
    expected, expected_late, _, _ = _run_all(FakeExecutor(), [*good[:2], _request("bad"), *good[2:]], late)
    expected.pop("bad")
    rebuilds: list[Fault] = []

    def rebuild(fault: Fault) -> FakeExecutor:
        rebuilds.append(fault)
        return PoisonExecutor()

    poisoned = [*good[:2], _request("bad", poisoned=True), *good[2:]]
    got, got_late, loop, health = _run_all(PoisonExecutor(), poisoned, late, rebuild)
    bad = got.pop("bad")
    assert isinstance(bad, RequestFaultError) and "ran alone" in str(bad)
    assert got == expected and got_late == expected_late  # late: served normally afterwards
    # First fault: everyone suspect; second: the same, so they run alone; third: "bad" alone.
    assert len(rebuilds) == 3 and health.state == "serving" and health.recoveries == 3, (rebuilds, health)
    assert not loop.quarantine.active


def test_deaths_blame_nobody_and_a_kill_during_a_trial_retries_it() -> None:
    q = Quarantine()
    assert q.after_fault({"a", "b"}) is None and not q.active
    assert q.after_fault(set()) is None and not q.active  # a death between: no repeat
    assert q.after_fault({"a", "b", "c"}) is None and not q.active
    assert q.after_fault({"b", "c", "d"}) is None and q.active  # b and c were blamed twice in a row
    assert q.hold({"a", "b", "c", "d"}) == {"a", "c", "d"} and q.on_trial == "b"
    assert q.after_fault(set()) is None  # a kill while b ran alone: b is tried again
    assert q.hold({"a", "b", "c", "d"}) == {"a", "c", "d"} and q.on_trial == "b"
    assert q.progress([RequestDelta("b")], {"a", "b", "c", "d"}) == (False, None)  # no token yet
    assert q.progress([RequestDelta("b", token_ids=[5])], {"a", "b", "c", "d"}) == (True, "c")
    assert q.after_fault({"c"}) == "c"  # it faulted alone
    assert q.hold({"a", "b", "d"}) == set() and not q.active  # no suspect left: everyone runs


@pytest.mark.parametrize("left", ["aborted", "finished"])
def test_a_request_that_leaves_its_trial_passes_it(left: str) -> None:
    q = Quarantine()
    q.after_fault({"a", "b"})
    q.after_fault({"a", "b"})
    assert q.hold({"a", "b"}) == {"b"}
    deltas = [RequestDelta("a", finish_reason="stop")] if left == "finished" else []
    open_ids = {"a", "b"} if left == "finished" else {"b"}
    assert q.progress(deltas, open_ids) == (True, "b")
    assert q.progress([RequestDelta("b", token_ids=[1])], {"b"}) == (True, None) and not q.active


def test_a_one_rank_engine_rebuilds_in_process_and_fails_only_the_poisoned_request(tiny_models, monkeypatch):
    """The real engine (mp backend, one rank in this process): a step that raises whenever the
    poisoned prompt is in it. The rank is rebuilt in process, the poisoned request fails alone
    and the others end with the tokens of the undisturbed run."""
    from strata import LLM
    from strata.actors.executor import DriverExecutor

    def requests(tag: str, poisoned: bool) -> list[EngineRequest]:
        prompts = [[5, 6, 7, 8], [9, 10, 11], [POISON, 12, 13] if poisoned else [14, 12, 13], [15, 16, 17, 18, 19]]
        return [EngineRequest(f"{tag}{i}", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
                for i, p in enumerate(prompts)]

    with LLM(tiny_models("llama"), distributed_executor_backend="mp", max_model_len=128) as llm:
        engine = llm._engine
        expected = asyncio.run(_outcomes(engine, requests("ref", poisoned=False)))
        submit, poisoned_ids = DriverExecutor.submit, set()

        def poisoned_submit(self, plan):
            poisoned_ids.update(n.seq_id for n in plan.new_sequences if POISON in n.prompt_token_ids.tolist())
            if poisoned_ids & set(plan.seq_ids.tolist()):
                raise RuntimeError("injected: a kernel failed on this request")
            return submit(self, plan)

        monkeypatch.setattr(DriverExecutor, "submit", poisoned_submit)
        got = asyncio.run(_outcomes(engine, requests("run", poisoned=True)))
        health = asyncio.run(engine.health())
    bad = got.pop("run2")
    assert isinstance(bad, RequestFaultError), bad
    assert {k.replace("run", "ref"): v for k, v in got.items()} == {k: v for k, v in expected.items() if k != "ref2"}
    assert health.state == "serving" and health.recoveries == 3, health
