"""The rank's persistent batch (actors/worker/persistent_batch.py): plans that carry only changes
add up to each step's full inputs.

Hand-made plans first (add, grow, preempt and resume, finish and row reuse, reordering, plans
that do not fit), then a property test: random engine runs (requests added and aborted, chunked
prefill, preemption, pipelined micro-batches), each plan through its wire form into a
PersistentBatch, whose StepInputs must equal a rebuild from scratch from the scheduler's own
sequences, step after step."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from strata.actors.engine.scheduler_records import SchedulerOutput
from strata.actors.worker.persistent_batch import PersistentBatch
from strata.actors.worker.step_inputs import StepInputs
from strata.distributed.step_plan import PlanBuilder, StepPlan
from strata.engine_protocol import EngineRequest
from strata.sampling_params import SamplingParams
from tests.engine_fakes import EOS, FakeExecutor, default_token, make_engine


def apply(batch: PersistentBatch, plan: PlanBuilder) -> StepInputs:
    return batch.apply(StepPlan.decode(plan.build().encode()))


def fields(inputs: StepInputs) -> dict:
    return {
        "rows": inputs.rows.tolist(), "seq_ids": inputs.seq_ids.tolist(),
        "start_positions": inputs.start_positions.tolist(), "query_lens": inputs.query_lens.tolist(),
        "token_ids": inputs.token_ids.tolist(), "block_tables": inputs.block_tables.tolist(),
        "samples": inputs.samples.tolist(), "prompt_logprobs": inputs.prompt_logprobs,
        "max_query_len": inputs.max_query_len, "max_seq_len": inputs.max_seq_len,
    }


def test_a_new_sequence_then_its_decodes() -> None:
    batch = PersistentBatch(block_size=4)
    plan = PlanBuilder(0)
    plan.announce(7, [11, 12, 13, 14, 15], {})
    plan.add(7, 5, new_block_ids=[3, 9], prompt_logprobs=2)
    inputs = apply(batch, plan)
    assert fields(inputs) == {
        "rows": [0], "seq_ids": [7], "start_positions": [0], "query_lens": [5], "token_ids": [11, 12, 13, 14, 15],
        "block_tables": [[3, 9]], "samples": [True], "prompt_logprobs": [2], "max_query_len": 5, "max_seq_len": 5}
    assert inputs.token_ids.dtype == np.int64 and inputs.block_tables.dtype == np.int32
    assert inputs.rows.dtype == np.int32 and inputs.start_positions.dtype == np.int32
    assert inputs.positions().tolist() == [0, 1, 2, 3, 4] and inputs.query_start_loc().tolist() == [0, 5]
    assert 7 in batch and batch.num_computed(7) == 5 and batch.num_prompt_tokens(7) == 5
    plan = PlanBuilder(1)
    plan.add(7, 1, new_token_ids=[50])  # the sampled token; still inside block 9
    inputs = apply(batch, plan)
    assert (inputs.start_positions.tolist(), inputs.token_ids.tolist(), inputs.block_tables.tolist()) == (
        [5], [50], [[3, 9]])
    assert inputs.samples.tolist() == [True] and inputs.prompt_logprobs == [None]
    assert batch.token_ids(7).tolist() == [11, 12, 13, 14, 15, 50]


def test_tables_and_token_lists_grow_past_their_first_size() -> None:
    batch = PersistentBatch(block_size=1, max_num_seqs=1, max_blocks_per_seq=1, max_tokens_per_seq=1)
    plan = PlanBuilder(0)
    plan.announce(1, [5, 6], {})
    plan.add(1, 2, new_block_ids=[0, 1])
    apply(batch, plan)
    for step in range(1, 40):
        plan = PlanBuilder(step)
        plan.add(1, 1, new_block_ids=[step + 1], new_token_ids=[100 + step])
        inputs = apply(batch, plan)
        assert inputs.start_positions.tolist() == [step + 1] and inputs.token_ids.tolist() == [100 + step]
        assert inputs.block_tables.tolist() == [list(range(step + 2))]
    assert batch.block_table(1).tolist() == list(range(41)) and len(batch.token_ids(1)) == 41
    assert batch.block_table_tensor.shape[1] >= 41
    np.testing.assert_array_equal(batch.block_table_tensor.numpy()[0, :41], np.arange(41))


def test_a_preempted_sequence_resumes_with_a_new_table_from_position_zero() -> None:
    batch = PersistentBatch(block_size=2)
    plan = PlanBuilder(0)
    plan.announce(4, [1, 2, 3], {})
    plan.add(4, 3, new_block_ids=[10, 11])
    apply(batch, plan)
    plan = PlanBuilder(1)
    plan.add(4, 1, new_block_ids=[12], new_token_ids=[40])
    apply(batch, plan)  # 4 tokens computed, token 41 sampled; then preempted (no plan says so)
    plan = PlanBuilder(2)
    plan.add(4, 3, new_block_ids=[7, 8], new_token_ids=[41], resumed=True)  # a chunk of 3 of 5 tokens
    inputs = apply(batch, plan)
    assert fields(inputs) | {"rows": None} == {
        "rows": None, "seq_ids": [4], "start_positions": [0], "query_lens": [3], "token_ids": [1, 2, 3],
        "block_tables": [[7, 8]], "samples": [False], "prompt_logprobs": [None], "max_query_len": 3,
        "max_seq_len": 3}
    assert batch.block_table(4).tolist() == [7, 8] and batch.block_table_tensor[batch.row_of(4), 2] == 0
    assert batch.changed_rows.tolist() == [batch.row_of(4)]
    plan = PlanBuilder(3)
    plan.add(4, 2, new_block_ids=[9])  # the rest: outputs it was told before the preemption
    inputs = apply(batch, plan)
    assert inputs.token_ids.tolist() == [40, 41] and inputs.samples.tolist() == [True]
    assert inputs.start_positions.tolist() == [3] and inputs.block_tables.tolist() == [[7, 8, 9]]


def test_finished_rows_are_freed_zeroed_and_reused_lowest_first() -> None:
    batch = PersistentBatch(block_size=4, max_num_seqs=2)
    plan = PlanBuilder(0)
    for seq_id in (1, 2, 3):  # more than max_num_seqs: the rows grow
        plan.announce(seq_id, [seq_id] * 4, {})
        plan.add(seq_id, 4, new_block_ids=[seq_id, 10 + seq_id])
    inputs = apply(batch, plan)
    assert inputs.rows.tolist() == [0, 1, 2] and batch.capacity >= 3
    plan = PlanBuilder(1, finished_seq_ids=[2, 1])
    plan.announce(9, [9], {})  # takes the lowest freed row, in the same plan
    plan.add(9, 1, new_block_ids=[20])
    plan.add(3, 1, new_token_ids=[33])
    inputs = apply(batch, plan)
    assert inputs.rows.tolist() == [0, 2] and sorted(batch.seq_ids()) == [3, 9] and len(batch) == 2
    assert 1 not in batch and 2 not in batch
    assert batch.block_table_tensor[1].tolist() == [0] * batch.block_table_tensor.shape[1]
    assert sorted(batch.changed_rows.tolist()) == [0, 1]  # freed 0 and 1, then 0's new table
    assert inputs.block_tables.tolist() == [[20, 0], [3, 13]]  # padded to the widest
    plan = PlanBuilder(2)
    plan.announce(10, [10, 10], {})
    plan.add(10, 2, new_block_ids=[21])
    assert apply(batch, plan).rows.tolist() == [1]


def test_inputs_follow_the_plans_order_not_the_rows() -> None:
    batch = PersistentBatch(block_size=8)
    plan = PlanBuilder(0)
    for seq_id in (5, 6, 7):
        plan.announce(seq_id, [seq_id * 10 + i for i in range(seq_id)], {})
        plan.add(seq_id, seq_id, new_block_ids=[seq_id])
    apply(batch, plan)
    plan = PlanBuilder(1)
    plan.add(7, 1, new_token_ids=[700])
    plan.add(5, 1, new_token_ids=[500])
    inputs = apply(batch, plan)  # 6 sits out
    assert (inputs.seq_ids.tolist(), inputs.rows.tolist(), inputs.start_positions.tolist()) == ([7, 5], [2, 0], [7, 5])
    assert inputs.token_ids.tolist() == [700, 500] and inputs.block_tables.tolist() == [[7], [5]]
    plan = PlanBuilder(2)
    plan.add(6, 1, new_token_ids=[600])
    plan.add(5, 1, new_token_ids=[501])
    plan.add(7, 1, new_block_ids=[17], new_token_ids=[701])  # position 8: a second block of 8
    inputs = apply(batch, plan)
    assert (inputs.seq_ids.tolist(), inputs.start_positions.tolist(), inputs.token_ids.tolist()) == (
        [6, 5, 7], [6, 6, 8], [600, 501, 701])
    assert inputs.max_seq_len == 9 and inputs.max_query_len == 1
    assert inputs.block_tables.tolist() == [[6, 0], [5, 0], [7, 17]]


def test_an_empty_plan_gives_empty_inputs_and_still_frees() -> None:
    batch = PersistentBatch(block_size=4)
    plan = PlanBuilder(0)
    plan.announce(1, [1], {})
    plan.add(1, 1, new_block_ids=[0])
    apply(batch, plan)
    inputs = apply(batch, PlanBuilder(1, finished_seq_ids=[1]))
    assert inputs.num_seqs == 0 and inputs.num_tokens == 0 and inputs.block_tables.shape == (0, 0)
    assert len(batch) == 0


@pytest.mark.parametrize("case, message", [
    ("unknown", "unknown to this rank"),
    ("twice", "schedules a sequence twice"),
    ("past_tokens", "knows 2 tokens"),
    ("past_table", "1 blocks of 1"),
    ("announced_twice", "announced twice"),
    ("finish_unknown", "does not hold it"),
    ("zero_tokens", "computes 0 tokens"),
])
def test_plans_that_do_not_fit_are_refused(case: str, message: str) -> None:
    batch = PersistentBatch(block_size=1)
    first = PlanBuilder(0)
    first.announce(1, [1, 2], {})
    first.add(1, 1, new_block_ids=[0])
    apply(batch, first)
    plan = PlanBuilder(1, finished_seq_ids=[99] if case == "finish_unknown" else [])
    if case == "unknown":
        plan.add(2, 1)
    elif case == "twice":
        plan.add(1, 1, new_block_ids=[1])
        plan.add(1, 1)
    elif case == "past_tokens":
        plan.add(1, 2, new_block_ids=[1, 2])
    elif case == "past_table":
        plan.add(1, 1)
    elif case == "announced_twice":
        plan.announce(1, [1], {})
    elif case == "zero_tokens":
        plan.add(1, 0)
    with pytest.raises(ValueError, match=message):
        apply(batch, plan)


# ---- random engine runs against a rebuild from scratch ----


class CheckingExecutor(FakeExecutor):
    """Checks every plan's StepInputs against the scheduler output it was built from."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.engine = None
        self.last_output: SchedulerOutput | None = None
        self.rows: dict[int, int] = {}  # a sequence keeps its row for its life
        self.max_num_seqs = 0
        self.checked = 0
        self.local: PersistentBatch | None = None  # rank 0's: it runs the plan object, not its wire form

    def watch(self, engine) -> None:
        self.engine = engine
        self.max_num_seqs = engine.config.max_num_seqs
        schedule = engine.scheduler.schedule

        def capture(*args, **kwargs):
            self.last_output = schedule(*args, **kwargs)
            return self.last_output

        engine.scheduler.schedule = capture

    def submit(self, plan):
        result = super().submit(plan)  # decodes the wire form and applies it to self.batch
        self.check(self.inputs[-1], self.last_output)
        if self.local is None:
            self.local = PersistentBatch(self.block_size)
        assert fields(self.local.apply(plan)) == fields(self.inputs[-1])
        return result

    def check(self, inputs: StepInputs, out: SchedulerOutput) -> None:
        expected = rebuild(out, self.engine.config.block_size)
        got = fields(inputs)
        rows = got.pop("rows")
        assert got == expected
        assert len(set(rows)) == len(rows) and max(rows) < self.max_num_seqs, "rows are reused"
        for ch, row in zip(out.chunks, rows, strict=True):
            assert self.rows.setdefault(ch.seq.seq_id, row) == row
        for seq_id in out.finished_seq_ids:
            self.rows.pop(seq_id)
        # Every sequence the ranks know, and what they know of it.
        batch, engine = self.batch, self.engine
        known = {s.seq_id: s for s in engine._seqs.values() if s.announced}
        assert set(batch.seq_ids()) == set(known) | set(engine.scheduler._finished_ids)
        for seq_id, seq in known.items():
            tokens = seq.prompt_token_ids + seq.output_token_ids
            assert batch.token_ids(seq_id).tolist() == tokens[: seq.num_tokens_sent]
            if not seq.resume_pending:  # a preempted sequence's rows keep the old table till it resumes
                assert batch.block_table(seq_id).tolist() == seq.block_ids[: seq.num_blocks_sent]
        table = batch.block_table_tensor.numpy()
        for seq_id in batch.seq_ids():
            row = batch.row_of(seq_id)
            assert not table[row, len(batch.block_table(seq_id)):].any(), "a table's padding is 0"
        self.checked += 1


def rebuild(out: SchedulerOutput, block_size: int) -> dict:
    """A step's inputs from scratch, from the scheduler's sequences."""
    chunks = out.chunks
    tables = [list(ch.seq.block_ids) for ch in chunks]
    width = max(len(t) for t in tables)
    plp = []
    for ch in chunks:
        top = ch.seq.params.prompt_logprobs
        first_pass = ch.seq.num_preemptions == 0 and ch.start_pos < len(ch.seq.prompt_token_ids) - 1
        plp.append(top if first_pass else None)
        assert ch.seq.num_computed_tokens == ch.start_pos
        assert len(ch.seq.block_ids) * block_size >= ch.start_pos + ch.num_tokens
    return {
        "seq_ids": [ch.seq.seq_id for ch in chunks],
        "start_positions": [ch.start_pos for ch in chunks],
        "query_lens": [ch.num_tokens for ch in chunks],
        "token_ids": [t for ch in chunks for t in ch.token_ids],
        "block_tables": [t + [0] * (width - len(t)) for t in tables],
        "samples": [ch.samples for ch in chunks],
        "prompt_logprobs": plp,
        "max_query_len": max(ch.num_tokens for ch in chunks),
        "max_seq_len": max(ch.start_pos + ch.num_tokens for ch in chunks),
    }


MAX_MODEL_LEN = 24

operations = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 12), st.integers(1, 12), st.sampled_from([None, None, 0, 2])),
    st.tuples(st.just("add"), st.integers(1, 12), st.integers(1, 12), st.sampled_from([None, None, 0, 2])),
    st.tuples(st.just("step"), st.integers(1, 6)),
    st.tuples(st.just("abort"), st.integers(0, 7)),
), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.sampled_from([1, 2, 4]),
    extra_blocks=st.integers(0, 6),
    max_num_seqs=st.integers(1, 5),
    budget=st.integers(1, 16),
    depth=st.sampled_from([1, 2]),
    eos_every=st.sampled_from([0, 5, 13]),
    ops=operations,
)
def test_plans_rebuild_every_step_from_changes_alone(block_size, extra_blocks, max_num_seqs, budget, depth,
                                                      eos_every, ops) -> None:
    def token_for(seq_id: int, n: int) -> int:
        return EOS if eos_every and (3 * seq_id + n) % eos_every == 0 else default_token(seq_id, n)

    executor = CheckingExecutor(token_for=token_for, pipelined=depth > 1)
    num_blocks = -(-MAX_MODEL_LEN // block_size) + extra_blocks  # few: preemption is common
    engine = make_engine(executor, max_model_len=MAX_MODEL_LEN, num_blocks=num_blocks, block_size=block_size,
                         max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, pipeline_parallel_size=depth)
    executor.watch(engine)
    names = iter(range(10**6))
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, plp = op
            params = SamplingParams(max_tokens=max_tokens, prompt_logprobs=plp, ignore_eos=eos_every == 0)
            prompt = [100 + (7 * i) % 13 for i in range(prompt_len)]
            engine.add_request(EngineRequest(f"r{next(names)}", prompt, params))
        elif op[0] == "step":
            for _ in range(op[1]):
                engine.step()
        else:
            live = list(engine._seqs)
            if live:
                engine.abort(live[op[1] % len(live)])
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 10_000
    assert executor.checked == len(executor.plans)
    assert engine.block_manager.num_free_blocks == num_blocks
    plans = executor.plans
    if not plans:
        return
    # What the run exercised (pytest --hypothesis-show-statistics shows how often).
    for name, seen in (("a preemption and resume", any(p.resumed.size for p in plans)),
                       ("a chunked prefill", any((i.query_lens > 1).any() and not i.samples.all()
                                                 for i in executor.inputs)),
                       ("a reused row", executor.batch._next_row < sum(len(p.new_sequences) for p in plans)),
                       ("prompt logprobs", any(p.prompt_logprobs.size for p in plans))):
        if seen:
            event(name)
