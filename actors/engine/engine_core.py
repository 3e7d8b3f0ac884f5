"""EngineCore: the driver's engine loop, one step at a time: schedule, run, process the results.

No Ray and no asyncio here: `Driver` runs this in a thread, `LLM` through the driver. The
executor hides where ranks live; `execute(plan)` returns the sampling rank's StepResult.
"""

from __future__ import annotations

import collections
import itertools
import logging
from typing import Protocol

from strata.actors.engine.block_manager import BlockManager
from strata.actors.engine.expert_load import ExpertLoad
from strata.actors.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from strata.actors.engine.sequence import Sequence, SequenceStatus
from strata.app.output.detokenizer import IncrementalDetokenizer, StopChecker
from strata.app.output.request_state import CompletionState, NoDetokenizer, RequestState, TokenText

from strata.config import EngineConfig
from strata.distributed.step_plan import Chunk, NewSequence, SamplerOptions, StepPlan, StepResult
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")


class Executor(Protocol):
    def submit(self, plan: StepPlan) -> StepResult | None: ...
    def collect(self, plan: StepPlan) -> StepResult: ...


class EngineCore:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer, vocab_size: int,
                 max_model_len: int, num_blocks: int, eos_token_ids: list[int], is_moe: bool = False):
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                            config.block_size, num_blocks),
            self.block_manager,
        )
        self.requests: dict[str, RequestState] = {}
        self._seq_owner: dict[int, tuple[RequestState, CompletionState]] = {}
        self._announced: set[int] = set()  # sequences whose sampling state the sampler holds
        self._finished_since_plan: list[int] = []
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self.token_text = TokenText(tokenizer)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_preemptions = 0
        self.last_step_seconds = 0.0
        # Micro-batches in flight: one per pipeline stage keeps every stage busy.
        self.pipeline_depth = config.pipeline_parallel_size
        self._in_flight: collections.deque[tuple[SchedulerOutput, StepPlan, StepResult | None]] = (
            collections.deque())
        self.expert_load = ExpertLoad()
        self.is_moe = is_moe

    # ---- requests in ----

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request the engine must not take; touches no engine state."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("The prompt is empty; it needs at least one token.")
        if n > self.max_model_len:
            raise ValueError(f"The prompt has {n} tokens, more than max_model_len={self.max_model_len}.")
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"Token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size}).")
        params.verify_max_logprobs(self.config.max_logprobs)
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer; this engine runs with skip_tokenizer_init=True")

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running")
        self.validate(prompt_token_ids, params)
        params = params.clone()
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(prompt_token_ids)
        state = RequestState(request_id, prompt, list(prompt_token_ids), params, [])
        for index in range(params.n):
            child = params if params.n == 1 else params.clone()
            if params.n > 1 and params.seed is not None:
                child.seed = params.seed + index  # distinct but reproducible draws per completion
            seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids))
            completion = CompletionState(
                index=index, seq_id=seq.seq_id, params=child,
                detokenizer=(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, child.skip_special_tokens)
                             if self.tokenizer is not None else NoDetokenizer()),
                stop=StopChecker(child.stop if isinstance(child.stop, list) else
                                 [child.stop] if child.stop else [], child.include_stop_str_in_output),
                eos_token_ids=self.eos_token_ids,
                logprobs=[] if child.logprobs is not None else None,
            )
            state.completions.append(completion)
            self._seq_owner[seq.seq_id] = (state, completion)
            self.scheduler.add(seq)
        self.requests[request_id] = state
        self.num_prompt_tokens += len(prompt_token_ids)

    def abort(self, request_id: str) -> RequestOutput | None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for c in state.completions:
            if c.finish_reason is None:
                c.abort()
                self._finish_seq(c.seq_id, SequenceStatus.FINISHED_ABORTED)
        return state.output()

    # ---- the loop ----

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """One engine step: fill the pipeline with up to `pipeline_depth` micro-batches, then
        finish the oldest; returns the requests whose output changed."""
        while len(self._in_flight) < self.pipeline_depth:
            scheduled = self.scheduler.schedule(self._micro_batch_cap())  # skips those in flight
            if scheduled.is_empty:
                break
            self.num_preemptions += len(scheduled.preempted)
            plan = self._build_plan(scheduled)
            self._in_flight.append((scheduled, plan, self.executor.submit(plan)))
        if not self._in_flight:
            return []
        scheduled, plan, result = self._in_flight.popleft()
        if result is None:
            result = self.executor.collect(plan)
        self.last_step_seconds = result.step_seconds
        self.expert_load.add(result.expert_load)
        self.scheduler.update(scheduled, {sid: r.token_id for sid, r in result.sampled.items()})
        return self._process(scheduled, result)

    def _micro_batch_cap(self) -> int | None:
        """With pipeline stages, an equal share of the sequences per micro-batch: one batch of
        everything would leave the other stages idle."""
        if self.pipeline_depth == 1:
            return None
        total = self.scheduler.num_running + self.scheduler.num_waiting
        return max(1, -(-total // self.pipeline_depth))

    def _build_plan(self, scheduled: SchedulerOutput) -> StepPlan:
        plan = StepPlan(step_id=next(self._step_ids), finished_seq_ids=self._finished_since_plan,
                        report_expert_load=self.is_moe)
        self._finished_since_plan = []
        for ch in scheduled.chunks:
            seq = ch.seq
            state, completion = self._seq_owner[seq.seq_id]
            if seq.seq_id not in self._announced:
                options = SamplerOptions.from_params(completion.params, self.eos_token_ids)
                plan.new_sequences.append(NewSequence(seq.seq_id, seq.prompt_token_ids, vars(options)))
                self._announced.add(seq.seq_id)
            # Prompt logprobs are computed on the first pass only, not again after a preemption.
            wants_plp = (completion.params.prompt_logprobs is not None and seq.num_preemptions == 0
                         and ch.start_pos < seq.num_prompt_tokens - 1)
            plan.chunks.append(Chunk(
                seq_id=seq.seq_id, start_pos=ch.start_pos, token_ids=ch.token_ids,
                block_table=list(seq.block_ids), samples=ch.samples,
                prompt_logprobs=completion.params.prompt_logprobs if wants_plp else None,
            ))
        return plan

    def _process(self, scheduled: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        changed: dict[str, RequestState] = {}
        for seq_id, plp in result.prompt_logprobs.items():
            state, _ = self._seq_owner[seq_id]
            if state.completions[0].seq_id == seq_id:  # the n completions share one prompt
                state.add_prompt_logprobs(plp, self.token_text)
        for seq_id, sampled in result.sampled.items():
            owner = self._seq_owner.get(seq_id)
            seq = self.scheduler.get(seq_id)
            if owner is None or seq is None:
                continue  # aborted while its step ran
            state, completion = owner
            self.num_generation_tokens += 1
            if completion.append(sampled, seq.num_tokens, self.max_model_len, self.token_text):
                status = (SequenceStatus.FINISHED_LENGTH if completion.finish_reason == "length"
                          else SequenceStatus.FINISHED_STOPPED)
                self._finish_seq(seq_id, status)
            changed[state.request_id] = state
        outputs = []
        for request_id, state in changed.items():
            outputs.append(state.output())
            if state.finished:
                del self.requests[request_id]
        return outputs

    def _finish_seq(self, seq_id: int, status: SequenceStatus) -> None:
        self.scheduler.finish(seq_id, status)
        self._seq_owner.pop(seq_id, None)
        if seq_id in self._announced:
            self._announced.discard(seq_id)
            self._finished_since_plan.append(seq_id)

    # ---- what the outside sees ----

    def stats(self) -> dict:
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": self.block_manager.usage,
            "num_free_blocks": self.block_manager.num_free_blocks,
            "num_blocks": self.block_manager.num_blocks,
            "prompt_tokens_total": self.num_prompt_tokens,
            "generation_tokens_total": self.num_generation_tokens,
            "num_preemptions_total": self.num_preemptions,
            "expert_load": self.expert_load.summary() if self.is_moe else None,
            "last_step_seconds": self.last_step_seconds,
        }
