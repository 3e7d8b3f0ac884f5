"""A fake executor for EngineCore tests: no model, tokens from a rule, plans and results through
their msgpack wire form (so what the engine sends is what ranks would get), plans applied to a
rank's PersistentBatch (so the engine's changes must add up to what a rank needs)."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from strata.actors.engine.engine_core import EngineCore
from strata.actors.worker.persistent_batch import PersistentBatch
from strata.actors.worker.step_inputs import StepInputs
from strata.config import EngineConfig
from strata.distributed.step_plan import StepPlan
from strata.distributed.step_result import PromptLogprobs, SampledResult, StepResult
from strata.engine_protocol import EngineRequest, RequestDelta
from strata.sampling_params import SamplingParams

EOS = 2
VOCAB = 1000


def default_token(seq_id: int, num_tokens: int) -> int:
    """The "model": the token sampled once a sequence holds `num_tokens` tokens (never eos)."""
    return 10 + (7 * seq_id + num_tokens) % 50


def prompt_logprob(position: int) -> float:
    return -0.25 * position


class FakeExecutor:
    """submit/collect like DriverExecutor. `pipelined`: submit returns None and collect gives
    the results back in order, as with pipeline stages. `fail_at`: the step_id whose submit raises."""

    def __init__(self, token_for: Callable[[int, int], int] = default_token, pipelined: bool = False,
                 fail_at: int | None = None):
        self.token_for = token_for
        self.pipelined = pipelined
        self.fail_at = fail_at
        self.plans: list[StepPlan] = []
        self.inputs: list[StepInputs] = []  # what the rank's persistent batch made of each plan
        self.batch: PersistentBatch | None = None  # made at the first plan, when block_size is known
        self.block_size = 4
        self.prompts: dict[int, list[int]] = {}
        self.announcements: Counter[int] = Counter()
        self.dropped: list[int] = []  # finished_seq_ids, in the order plans carried them
        self._pending: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> StepResult | None:
        if plan.step_id == self.fail_at:
            raise RuntimeError("injected step failure")
        plan = StepPlan.decode(plan.encode())
        self.plans.append(plan)
        result = StepResult.decode(self._run(plan).encode())
        if self.pipelined:
            self._pending.append(result)
            return None
        return result

    def collect(self, plan: StepPlan) -> StepResult:
        result = self._pending.popleft()
        assert result.step_id == plan.step_id, "results collected out of order"
        return result

    def _run(self, plan: StepPlan) -> StepResult:
        result = StepResult(plan.step_id, step_seconds=0.001)
        self.dropped += plan.finished_seq_ids.tolist()
        for new in plan.new_sequences:
            self.prompts[new.seq_id] = new.prompt_token_ids.tolist()
            self.announcements[new.seq_id] += 1
        if self.batch is None:
            self.batch = PersistentBatch(self.block_size, max_num_seqs=2, max_blocks_per_seq=2,
                                         max_tokens_per_seq=4)  # small, so that it grows
        inputs = self.batch.apply(plan)
        self.inputs.append(inputs)
        for i, seq_id in enumerate(inputs.seq_ids.tolist()):
            start, n = int(inputs.start_positions[i]), int(inputs.query_lens[i])
            top = inputs.prompt_logprobs[i]
            if top is not None:
                prompt = self.prompts[seq_id]
                usable = max(0, min(n, len(prompt) - 1 - start))
                if usable:
                    positions = range(start + 1, start + 1 + usable)
                    result.prompt_logprobs[seq_id] = PromptLogprobs(
                        start, [(prompt_logprob(p), 1, [(prompt[p], prompt_logprob(p))]) for p in positions])
            if inputs.samples[i]:
                tok = self.token_for(seq_id, start + n)
                result.sampled[seq_id] = SampledResult(tok, -0.5, 2, [(3, -0.1), (tok, -0.5)])
        return result


def make_engine(executor: FakeExecutor | None = None, *, max_model_len: int = 64, num_blocks: int = 64,
                block_size: int = 4, **config) -> EngineCore:
    config.setdefault("max_num_batched_tokens", 64)
    config.setdefault("async_scheduling", False)  # these tests step synchronously; see test_async_scheduling.py
    cfg = EngineConfig(block_size=block_size, **config)
    executor = executor or FakeExecutor()
    executor.block_size = block_size
    return EngineCore(cfg, executor, vocab_size=VOCAB, eos_token_ids=[EOS],
                      max_model_len=max_model_len, num_blocks=num_blocks)


def request(request_id: str, prompt_len: int = 3, **params) -> EngineRequest:
    return EngineRequest(request_id, [100 + i for i in range(prompt_len)], SamplingParams(**params))


def run(engine: EngineCore, max_steps: int = 10_000) -> list[list[RequestDelta]]:
    """Steps until nothing is left; every step's deltas."""
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
        assert len(steps) < max_steps, "no progress"
    return steps


def by_request(steps: list[list[RequestDelta]]) -> dict[str, list[RequestDelta]]:
    out: dict[str, list[RequestDelta]] = {}
    for deltas in steps:
        for d in deltas:
            out.setdefault(d.request_id, []).append(d)
    return out


def tokens(deltas: list[RequestDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]
