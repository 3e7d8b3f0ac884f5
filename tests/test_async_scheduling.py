"""Async scheduling (one rank): step N+1 is scheduled while step N runs, its decoding sequences fed
the token step N samples (PENDING_TOKEN in the plan, filled by the sampling rank on its device).

Against the engine stepping synchronously, which is the reference: the same tokens and finish
reasons for every request, with preemption, stop tokens and penalties in the mix; with a fake
executor whose futures complete out of the order they were submitted (the engine reads results in
submission order, so that is handled by design); and with the real model on CPU."""

from __future__ import annotations

import random
import threading

import pytest

from strata import LLM, SamplingParams
from strata.distributed.step_plan import PENDING_TOKEN, StepPlan
from strata.distributed.step_result import StepResult
from tests.engine_fakes import EOS, FakeExecutor, by_request, make_engine, run


def _token_after(seq_id: int, num_tokens: int, fed: int) -> int:
    """The fake model's next token depends on the token it was fed: a wrong feed shows."""
    tok = 10 + (7 * seq_id + 3 * num_tokens + fed) % 60
    return EOS if tok == 13 else tok


class _Future:
    """Completes on its own timer; `result()` waits for it, as a device step does."""

    def __init__(self, result: StepResult, delay_s: float, on_read):
        self._result, self._on_read = result, on_read
        self._done = threading.Event()
        threading.Timer(delay_s, self._done.set).start()

    def result(self) -> StepResult:
        assert self._done.wait(5), "a future never completed"
        self._on_read(self._result)
        return self._result


class AsyncFakeExecutor(FakeExecutor):
    """Feeds PENDING_TOKEN rows from its own last draws and hands back futures. `reverse`: every
    odd step completes before the even step submitted just before it."""

    def __init__(self, reverse: bool = False):
        super().__init__()
        self.reverse = reverse
        self.last_draws: dict[int, int] = {}
        self.pending_fed = 0
        self._ends: dict[int, dict[int, int]] = {}  # step id -> where each draw sits

    def submit(self, plan: StepPlan):
        plan = StepPlan.decode(plan.encode())
        self.plans.append(plan)
        result = StepResult.decode(self._run(plan).encode())
        delay = (0.0005 if plan.step_id % 2 else 0.004) if self.reverse else 0.0
        return _Future(result, delay, self._read)

    def _read(self, result: StepResult) -> None:
        """What the sampling rank does when its tokens are read: fill the placeholders."""
        assert self.batch is not None
        ids = list(result.sampled)
        ends = self._ends.pop(result.step_id)
        positions = [ends[s] for s in ids]
        self.batch.fill_pending(ids, positions, [result.sampled[s].token_id for s in ids])

    def _run(self, plan: StepPlan) -> StepResult:
        result = super()._run(plan)  # applies the plan to the batch; its tokens are replaced below
        inputs = self.inputs[-1]
        qsl = inputs.query_start_loc()
        draws, ends = {}, self._ends.setdefault(plan.step_id, {})
        for i, seq_id in enumerate(inputs.seq_ids.tolist()):
            fed = int(inputs.token_ids[qsl[i + 1] - 1])
            if fed == PENDING_TOKEN:
                fed = self.last_draws[seq_id]  # KeyError: fed a token its last step did not draw
                self.pending_fed += 1
            assert PENDING_TOKEN not in inputs.token_ids[qsl[i]: qsl[i + 1] - 1].tolist(), "a stale placeholder"
            if seq_id in result.sampled:
                end = int(inputs.start_positions[i] + inputs.query_lens[i])
                tok = _token_after(seq_id, end, fed)
                result.sampled[seq_id].token_id = tok
                draws[seq_id], ends[seq_id] = tok, end
        self.last_draws = draws
        return result


def _mixed_requests(n: int = 64):
    from strata.engine_protocol import EngineRequest

    rng = random.Random(0)
    out = []
    for i in range(n):
        params = dict(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.5)
        if i % 9 == 0:
            params["stop_token_ids"] = [11, 12]
        if i % 11 == 0:
            params["repetition_penalty"] = 1.2  # its sampling reads its outputs: never continued ahead
        prompt = [100 + rng.randrange(500) for _ in range(rng.randint(1, 30))]
        out.append(EngineRequest(f"r{i}", prompt, SamplingParams(**params)))
    return out


def _outputs(executor: FakeExecutor, async_scheduling: bool, add_every: int = 3):
    """Requests arrive a few per step; returns each request's tokens and finish reason."""
    engine = make_engine(executor, num_blocks=40, max_num_batched_tokens=32, max_num_seqs=16,
                         async_scheduling=async_scheduling)
    waiting = _mixed_requests()
    steps = []
    while waiting or engine.has_unfinished():
        for _ in range(add_every):
            if waiting:
                engine.add_request(waiting.pop(0))
        steps.append(engine.step())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    per = by_request(steps)
    return {rid: ([t for d in ds for t in d.token_ids], ds[-1].finish_reason) for rid, ds in per.items()}, engine


@pytest.mark.parametrize("reverse", [False, True])
def test_async_steps_give_the_synchronous_outputs(reverse: bool) -> None:
    sync_executor = AsyncFakeExecutor()
    reference, sync_engine = _outputs(sync_executor, async_scheduling=False)
    executor = AsyncFakeExecutor(reverse=reverse)
    outputs, engine = _outputs(executor, async_scheduling=True)
    assert outputs == reference
    assert len(outputs) == 64
    assert executor.pending_fed > 100 and sync_executor.pending_fed == 0  # the async path really ran
    assert engine.num_preemptions > 0 and sync_engine.num_preemptions > 0
    assert any(reason == "stop" for _, reason in reference.values())


def test_a_sequence_that_stops_drops_its_one_step_ahead() -> None:
    """A stop token is known only when its step is read: the step after it already ran for the
    sequence; its token is dropped and the sequence's blocks come back."""
    executor = AsyncFakeExecutor()
    engine = make_engine(executor, async_scheduling=True)
    from strata.engine_protocol import EngineRequest

    engine.add_request(EngineRequest("a", [100, 101, 102], SamplingParams(max_tokens=30, stop_token_ids=[13])))
    out = by_request(run(engine))["a"]
    tokens = [t for d in out for t in d.token_ids]
    assert out[-1].finish_reason in ("stop", "length")
    sync = make_engine(AsyncFakeExecutor(), async_scheduling=False)
    sync.add_request(EngineRequest("a", [100, 101, 102], SamplingParams(max_tokens=30, stop_token_ids=[13])))
    assert tokens == [t for d in by_request(run(sync))["a"] for t in d.token_ids]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.slow
def test_async_scheduling_matches_synchronous_on_the_model(tiny_models) -> None:
    """The real runner on CPU: greedy and seeded sampling, 64 requests, a cache small enough to
    preempt: async and synchronous stepping give the same tokens."""
    model = tiny_models("llama")
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(5, 400) for _ in range(rng.randint(2, 60))]} for _ in range(64)]
    params = [SamplingParams(temperature=0 if i % 2 else 0.8, seed=i, max_tokens=rng.randint(1, 24),
                             ignore_eos=True, logprobs=2 if i % 5 == 0 else None) for i in range(64)]
    runs = []
    for async_scheduling in (False, True):
        with LLM(model, async_scheduling=async_scheduling, distributed_executor_backend="mp",
                 num_kv_blocks_override=24, max_num_batched_tokens=64,
                 max_num_seqs=16, max_model_len=128) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs])
            assert llm.stats()["num_preemptions_total"] > 0
    assert runs[0] == runs[1]
