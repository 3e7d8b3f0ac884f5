"""EngineCore: the driver's engine loop, one step at a time: schedule, run, turn results into deltas.

No Ray, no asyncio and no tokenizer here: `Driver` runs this in a thread. Requests come in as
token ids (`EngineRequest`, one completion each: callers fan out n); every step returns one
`RequestDelta` per request that changed, holding only what is new, so what leaves the engine per
step does not grow with a request's length. The executor hides where ranks live: `submit(plan)`
starts a step and returns the sampling rank's StepResult when rank 0 samples, else None and
`collect(plan)` returns it later.

Finishing (vLLM's order, per sampled token, once `min_tokens` tokens are out): a user stop id or,
unless ignore_eos, an eos id -> "stop" (stop_reason: the user's stop id, None for eos); else
max_tokens or max_model_len -> "length". Stop strings are the caller's (its output processor
finds them and aborts the request).
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Collection, Iterable
from typing import Protocol

import msgpack

from strata.actors.engine.block_manager import BlockManager
from strata.actors.engine.expert_load import ExpertLoad
from strata.actors.engine.scheduler import Scheduler
from strata.actors.engine.scheduler_records import SchedulerConfig, SchedulerOutput
from strata.actors.engine.sequence import Sequence, SequenceStatus
from strata.config import EngineConfig, async_steps
from strata.distributed.sampler_options import SamplerOptions
from strata.distributed.step_plan import PlanBuilder, StepPlan
from strata.distributed.step_result import SampledResult, StepResult
from strata.engine_protocol import EngineRequest, RequestDelta, TokenLogprobs, check_prompt, outside_vocabulary
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

HOST_SAMPLES = 64  # recent steps' host overhead kept for /metrics (a sample when steps outpace polls)


class StepFuture(Protocol):
    """A step launched but not read (async scheduling): `result()` waits for it if need be."""

    def result(self) -> StepResult: ...


class Executor(Protocol):
    def submit(self, plan: StepPlan) -> StepResult | StepFuture | None: ...
    def collect(self, plan: StepPlan) -> StepResult: ...


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, vocab_size: int,
                 eos_token_ids: list[int] | tuple[int, ...], max_model_len: int, num_blocks: int,
                 is_moe: bool = False):
        self.config = config
        self.executor = executor
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._eos = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                            config.block_size, num_blocks),
            self.block_manager,
        )
        self._seqs: dict[str, Sequence] = {}  # the one map of unfinished requests
        # Of those, the ones kept out of the scheduler while a suspect runs alone (quarantine.py)
        self._held: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_preemptions = 0
        self.last_step_seconds = 0.0
        # Host overhead: a step's wall time less the executor's (schedule + plan + outputs), as
        # (perf_counter at the step's end, seconds) for the most recent steps, for /metrics.
        self.host_overhead: collections.deque[tuple[float, float]] = collections.deque(maxlen=HOST_SAMPLES)
        self.step_tokens: collections.deque[tuple[float, int]] = collections.deque(maxlen=HOST_SAMPLES)
        # Steps in flight: with pipeline stages one micro-batch per stage keeps every stage busy;
        # with async scheduling (one rank) step N+1 is scheduled while step N runs. Results are
        # read in the order the steps were submitted, whenever each future completes.
        self.async_steps = async_steps(config)
        self.pipeline_depth = 2 if self.async_steps else config.pipeline_parallel_size
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepPlan, StepResult | StepFuture | None]] = (
            collections.deque())
        self.expert_load = ExpertLoad(config.expert_load_interval)
        self.is_moe = is_moe

    # ---- requests in ----

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request the engine must not take; touches no engine state, so
        any thread may call it."""
        if params.n != 1:
            raise ValueError(f"n={params.n}: the engine runs one completion per request; "
                             "send n requests instead.")
        check_prompt(prompt_token_ids, params, max_model_len=self.max_model_len, vocab_size=self.vocab_size,
                     max_logprobs=self.config.max_logprobs)

    def add_request(self, request: EngineRequest, held: bool = False) -> None:
        """Queues the request (`held`: kept out of the scheduler until `release`)."""
        if request.request_id in self._seqs:
            raise ValueError(f"request_id {request.request_id!r} is already running")
        self.validate(request.prompt_token_ids, request.params)
        prompt = list(request.prompt_token_ids)
        params = request.params.clone()  # the engine's own copy: the caller's is never changed
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(prompt)
        outputs = list(request.resumed_output_token_ids)
        if outputs:
            self._check_resumed(prompt, outputs, params)
        seq = Sequence(next(self._seq_ids), request.request_id, prompt, params, output_token_ids=outputs,
                       arrival_time=time.monotonic())
        if outputs:
            seq.num_preemptions = 1  # as after a recovery: its prompt logprobs were delivered already
        seq.sampler_options = self._sampler_options(request.request_id, params)
        if held:
            self._held[request.request_id] = seq
        else:
            self.scheduler.add(seq)
        self._seqs[request.request_id] = seq
        self.num_prompt_tokens += len(prompt)

    def _check_resumed(self, prompt: list[int], outputs: list[int], params: SamplingParams) -> None:
        """A resumed request must still have a token to generate: one that had reached its end
        would have been delivered finished."""
        bad = outside_vocabulary(outputs, self.vocab_size)
        if bad:
            raise ValueError(f"resumed output token ids {bad} are outside the vocabulary [0, {self.vocab_size}).")
        if len(outputs) >= params.max_tokens or len(prompt) + len(outputs) >= self.max_model_len:
            raise ValueError(f"the request has {len(outputs)} output tokens already: nothing is left to generate "
                             f"(max_tokens={params.max_tokens}, max_model_len={self.max_model_len}).")

    def _sampler_options(self, request_id: str, params: SamplingParams) -> dict:
        """The options the ranks get, checked now to travel in a plan: a request that cannot be
        encoded fails alone, here, rather than the step of every request beside it."""
        options = vars(SamplerOptions.from_params(params, self.eos_token_ids))
        try:
            msgpack.packb(options, use_bin_type=True)
        except (OverflowError, TypeError, ValueError) as err:
            raise ValueError(f"request {request_id!r}: its sampling parameters cannot be sent to the ranks "
                             f"({err}); check the ranges of seed, top_k, min_tokens and the token ids") from None
        return options

    def abort(self, request_id: str) -> RequestDelta | None:
        """Ends the request and frees its blocks; its final delta, or None for an unknown id."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        if self._held.pop(request_id, None) is not None:  # never scheduled on this gang
            del self._seqs[request_id]
        else:
            self._finish(seq, SequenceStatus.FINISHED_ABORTED)
        return RequestDelta(request_id, finish_reason="abort")

    def abort_all(self) -> list[RequestDelta]:
        return [self.abort(request_id) for request_id in list(self._seqs)]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._seqs

    # ---- the loop ----

    def has_unfinished(self) -> bool:
        """Requests queued or running, or micro-batches whose results are still to collect."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def step(self) -> list[RequestDelta]:
        """One engine step: fill the pipeline with up to `pipeline_depth` micro-batches, then
        finish the oldest; returns a delta per request that changed."""
        started = time.perf_counter()
        executor_s = 0.0  # rank 0's own share of the step runs inside submit (tp/pp rank 0)
        while len(self._in_flight) < self.pipeline_depth:
            # Skips those in flight, but with async scheduling continues the decoding ones.
            scheduled = self.scheduler.schedule(self._micro_batch_cap(), continue_in_flight=self.async_steps)
            self.num_preemptions += len(scheduled.preempted)
            if scheduled.is_empty:
                break
            plan = self._build_plan(scheduled)
            t = time.perf_counter()
            self._in_flight.append((scheduled, plan, self.executor.submit(plan)))
            executor_s += time.perf_counter() - t
        if not self._in_flight:
            return []
        scheduled, plan, submitted = self._in_flight.popleft()
        t = time.perf_counter()
        if submitted is None:
            result = self.executor.collect(plan)
        elif isinstance(submitted, StepResult):
            result = submitted
        else:
            result = submitted.result()  # waits for the device, if it still runs the step
        executor_s += time.perf_counter() - t
        self.last_step_seconds = result.step_seconds
        self.expert_load.add(result.expert_load)
        self.scheduler.update(scheduled, {sid: r.token_id for sid, r in result.sampled.items()})
        deltas = self._process(scheduled, result)
        ended = time.perf_counter()
        host_s = ended - started - executor_s
        self.host_overhead.append((ended, host_s))
        self.step_tokens.append((ended, scheduled.num_tokens))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: %d sequences, %d tokens; host %.3f ms, executor %.3f ms", plan.step_id,
                         len(scheduled.chunks), scheduled.num_tokens, host_s * 1e3, executor_s * 1e3)
        if self.expert_load.pending and not self.has_unfinished():
            self._flush_expert_load()
        return deltas

    def _flush_expert_load(self) -> None:
        """Out of work: one empty plan collects the counts of the steps since the last report."""
        self.expert_load.flushed()
        plan = PlanBuilder(next(self._step_ids), report_expert_load=True).build()
        submitted = self.executor.submit(plan)
        if submitted is None:
            result = self.executor.collect(plan)
        else:
            result = submitted if isinstance(submitted, StepResult) else submitted.result()
        self.expert_load.add(result.expert_load)

    def _micro_batch_cap(self) -> int | None:
        """With pipeline stages, an equal share of the sequences per micro-batch: one batch of
        everything would leave the other stages idle."""
        if self.config.pipeline_parallel_size == 1:
            return None
        total = self.scheduler.num_running + self.scheduler.num_waiting
        return max(1, -(-total // self.pipeline_depth))

    def _build_plan(self, scheduled: SchedulerOutput) -> StepPlan:
        """The scheduler's output as changes for the ranks' persistent batches (see
        strata.distributed.step_plan): a decode costs a few ints, whatever the context length."""
        report = self.is_moe and self.expert_load.due()
        plan = PlanBuilder(next(self._step_ids), scheduled.finished_seq_ids, report)
        add = plan.add
        for ch in scheduled.chunks:
            seq = ch.seq
            if ch.is_new:
                seq.queued_s = time.monotonic() - seq.arrival_time
                plan.announce(seq.seq_id, seq.prompt_token_ids, seq.sampler_options)
            # Prompt logprobs are computed on the first pass only, not again after a preemption.
            top = seq.params.prompt_logprobs
            if top is not None and (seq.num_preemptions or ch.start_pos >= len(seq.prompt_token_ids) - 1):
                top = None
            if ch.new_block_ids or ch.resumed or top is not None:
                add(seq.seq_id, ch.num_tokens, ch.new_block_ids, ch.new_token_ids, ch.resumed, top)
            else:
                plan.add_plain(seq.seq_id, ch.num_tokens, ch.new_token_ids)
        return plan.build()

    def _process(self, scheduled: SchedulerOutput, result: StepResult) -> list[RequestDelta]:
        deltas = []
        all_plp, sampled = result.prompt_logprobs, result.sampled
        take = self._take_token
        for ch in scheduled.chunks:
            seq = ch.seq
            if seq.status._finished:  # aborted while its step ran (SequenceStatus.is_finished)
                continue
            plp = all_plp.get(seq.seq_id) if all_plp else None
            if plp is None:
                if ch.samples:
                    deltas.append(take(seq, sampled[seq.seq_id], RequestDelta(seq.request_id)))
                continue
            delta = RequestDelta(seq.request_id)
            delta.prompt_logprobs = [TokenLogprobs(lp, rank, top) for lp, rank, top in plp.entries]
            if ch.samples:
                take(seq, sampled[seq.seq_id], delta)
            deltas.append(delta)
        return deltas

    def _take_token(self, seq: Sequence, sampled: SampledResult, delta: RequestDelta) -> RequestDelta:
        """`sampled` was just appended to `seq` (Scheduler.update); record it in the delta and
        finish the sequence if this token ends it. Returns the delta."""
        tok, p = sampled.token_id, seq.params
        self.num_generation_tokens += 1
        delta.token_ids.append(tok)
        if seq.queued_s is not None:  # its first token: how long it waited to be scheduled
            delta.queued_s, seq.queued_s = seq.queued_s, None
        if p.logprobs is not None:
            delta.logprobs = [TokenLogprobs(sampled.logprob, sampled.rank, sampled.top_logprobs)]
        num_out = len(seq.output_token_ids)
        if num_out >= p.min_tokens and (tok in p.stop_token_ids or (not p.ignore_eos and tok in self._eos)):
            delta.finish_reason = "stop"
            delta.stop_reason = tok if tok in p.stop_token_ids else None  # None means eos, as vLLM
            self._finish(seq, SequenceStatus.FINISHED_STOPPED)
        elif num_out >= p.max_tokens or len(seq.prompt_token_ids) + num_out >= self.max_model_len:
            delta.finish_reason = "length"
            self._finish(seq, SequenceStatus.FINISHED_LENGTH)
        return delta

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.scheduler.finish(seq, status)  # the scheduler tells the ranks, in its next output
        del self._seqs[seq.request_id]

    # ---- after a fault ----

    def in_flight_request_ids(self) -> list[str]:
        """The requests in the steps launched and not read: those a failed step blames."""
        return [seq.request_id for seq in self._seqs.values() if seq.in_flight]

    def release(self, request_ids: Iterable[str]) -> None:
        """Held requests join the scheduler's queue (oldest first, as resumed ones)."""
        for request_id in request_ids:
            seq = self._held.pop(request_id, None)
            if seq is not None:
                self.scheduler.add(seq)

    def resume_on(self, executor: Executor, hold: Collection[str] = ()) -> int:
        """Continues on a rebuilt gang, whose ranks know no sequence and hold no cache: every
        unfinished request is queued again, oldest first, as prompt + the tokens it has produced
        (recompute, as a preemption), to be announced afresh. Steps in flight are dropped: their
        tokens were never delivered, so a stream neither repeats nor misses a token, and seeded
        sampling continues where it stood (its noise is a function of (seed, position)). Those
        in `hold` wait outside the scheduler until `release`. Returns the number resumed."""
        self.executor = executor
        self._in_flight.clear()
        self._held = {}
        seqs = sorted(self._seqs.values(), key=lambda s: s.arrival_order)
        self.block_manager = BlockManager(self.block_manager.num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.scheduler.config, self.block_manager)
        for seq in seqs:
            if seq.output_token_ids:
                seq.num_preemptions += 1  # its prompt logprobs were delivered: not computed again
            seq.status, seq.arrival_order, seq.block_ids, seq.num_computed_tokens = SequenceStatus.WAITING, -1, [], 0
            seq.in_flight, seq.num_in_flight_tokens, seq.pending_sample = 0, 0, False
            seq.announced, seq.num_blocks_sent, seq.num_tokens_sent, seq.resume_pending = False, 0, 0, False
            if seq.request_id in hold:
                self._held[seq.request_id] = seq
            else:
                self.scheduler.add(seq)
        return len(seqs)

    # ---- what the outside sees ----

    def stats(self) -> dict:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting + len(self._held),
            "kv_cache_usage": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
            "num_preemptions_total": self.num_preemptions,
            "expert_load": self.expert_load.summary() if self.is_moe else None,
            "last_step_seconds": self.last_step_seconds,
            "step_host_overhead": list(self.host_overhead),
            "step_tokens": list(self.step_tokens),  # (end, tokens computed) of recent steps
        }
