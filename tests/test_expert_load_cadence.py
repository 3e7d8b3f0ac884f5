"""The expert load report's cadence (actors/engine/expert_load.py): plans ask the ranks for their
MoE counters every `expert_load_interval` steps, not every step, plus one empty plan when the
engine runs out of work, so the report adds up to every token routed and never lags behind."""

from __future__ import annotations

from strata.actors.engine.engine_core import EngineCore
from strata.config import EngineConfig
from strata.distributed.step_plan import StepPlan
from strata.distributed.step_result import StepResult
from tests.engine_fakes import EOS, VOCAB, FakeExecutor, request, run

TOP_K, EXPERTS = 2, 4


class CountingExecutor(FakeExecutor):
    """Rank counters as a fake: every token scheduled routes to experts 0 and 1; a plan that asks
    for the counts gets those since the last ask, then they reset (as take_counts)."""

    def __init__(self) -> None:
        super().__init__()
        self.unread = 0

    def _run(self, plan: StepPlan) -> StepResult:
        result = super()._run(plan)
        self.unread += plan.num_tokens
        if plan.report_expert_load:
            per_expert = [self.unread, self.unread, 0, 0]  # one layer, one EP rank
            result.expert_load = [{"layers": [0], "per_expert": [per_expert], "per_rank": [[2 * self.unread]]}]
            self.unread = 0
        return result


def engine(interval: int) -> EngineCore:
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=64, async_scheduling=False,
                       expert_load_interval=interval)
    executor = CountingExecutor()
    return EngineCore(cfg, executor, vocab_size=VOCAB, eos_token_ids=[EOS], max_model_len=64, num_blocks=64,
                      is_moe=True)


def test_counters_are_read_every_n_steps_and_when_the_engine_runs_dry() -> None:
    core = engine(interval=4)
    core.add_request(request("a", prompt_len=5, max_tokens=10))
    core.add_request(request("b", prompt_len=3, max_tokens=7))
    run(core)
    plans = core.executor.plans
    asked = [i for i, p in enumerate(plans) if p.report_expert_load]
    # 10 steps (one prefill, nine decodes); the 4th and 8th ask, then an empty plan collects the rest.
    assert len(plans) == 11 and asked == [3, 7, 10] and plans[-1].num_seqs == 0
    load = core.stats()["expert_load"]
    routed = sum(p.num_tokens for p in plans)
    assert routed == 5 + 3 + 9 + 6 and load["per_expert"] == [[routed, routed, 0, 0]]
    assert core.executor.unread == 0


def test_no_extra_plan_when_the_last_step_asked() -> None:
    core = engine(interval=2)
    core.add_request(request("a", prompt_len=3, max_tokens=4))  # 4 steps: the 2nd and 4th ask
    run(core)
    assert [p.report_expert_load for p in core.executor.plans] == [False, True, False, True]


def test_a_dense_model_never_asks() -> None:
    core = engine(interval=1)
    core.is_moe = False
    core.add_request(request("a", max_tokens=3))
    run(core)
    assert not any(p.report_expert_load for p in core.executor.plans)
