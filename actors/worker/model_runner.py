"""Runs one StepPlan on this rank's shard: plan -> persistent batch -> StepInputs -> tensors ->
forward -> (last stage) logits -> sample.

The same code runs on every rank; what a rank does depends on its coordinates: the first stage
embeds tokens, other stages receive hidden states from the previous stage, the last stage
computes logits, and only the sampling rank (tensor rank 0 of the last stage) samples (and
keeps the structured-output matchers, made from `grammars` when a sequence is announced). Every
rank applies every plan to its PersistentBatch (the plan carries only changes) and reads the
step's inputs from it as numpy (StepInputs).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from strata.actors.worker.cuda_graphs import CaptureReport, DecodeGraphs
from strata.actors.worker.input_buffers import InputBuffers
from strata.actors.worker.pending_step import PendingStep
from strata.actors.worker.persistent_batch import PersistentBatch
from strata.actors.worker.step_inputs import StepInputs
from strata.actors.worker.step_timing import StepTimer
from strata.distributed.channel import PendingSends
from strata.distributed.process_groups import RankGroups
from strata.distributed.sampler_options import SamplerOptions
from strata.distributed.step_plan import PENDING_TOKEN, StepPlan
from strata.distributed.step_result import PromptLogprobs, StepResult
from strata.model.architectures.intermediate import IntermediateTensors
from strata.model.grammar import GrammarSource
from strata.model.grammar_mask import GrammarState
from strata.model.sampler import Sampler, SequenceSamplingState

logger = logging.getLogger("strata.worker")


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], groups: RankGroups, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, max_num_seqs: int = 256,
                 max_model_len: int = 2048, max_num_batched_tokens: int = 2048,
                 graph_sizes: list[int] | None = None, grammars: GrammarSource | None = None):
        """`graph_sizes`: decode batch sizes to capture CUDA graphs for (`capture_graphs`); None: every
        step runs eagerly. `grammars`: where the sampling rank compiles structured-output grammars
        from (None: without a tokenizer, a structured request is restricted to its stop tokens)."""
        self.model = model
        self.kv_caches = kv_caches
        self.groups = groups
        self.coords = groups.coords
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.sampler = Sampler()
        self.grammars = grammars
        # Sizes are hints: the batch grows when a plan needs more.
        self.batch = PersistentBatch(block_size, max_num_seqs=max_num_seqs,
                                     max_blocks_per_seq=-(-max_model_len // block_size),
                                     max_tokens_per_seq=max_model_len, pin_memory=device.type == "cuda")
        # Persistent device buffers at their largest sizes (a step never has more sequences than tokens).
        self.input_buffers = InputBuffers(max_num_batched_tokens, min(max_num_seqs, max_num_batched_tokens),
                                          -(-max_model_len // block_size), block_size, device)
        self.sampling_states: dict[int, SequenceSamplingState] = {}
        # When each step's compute ran, from its inputs' arrival to its outputs' sending (CUDA
        # events, read lazily: no sync per step), so tests can check that pipeline stages overlap.
        self.timer = StepTimer(device)
        self.pending = PendingSends()
        self.is_moe = hasattr(model, "expert_load")
        # The last step's draws on the device, by sequence: what PENDING_TOKEN rows feed.
        self._last_sampled: tuple[dict[int, int], torch.Tensor] | None = None
        self.graphs: DecodeGraphs | None = None
        if graph_sizes:
            self.graphs = DecodeGraphs(model, kv_caches, self.input_buffers, graph_sizes, max_model_len,
                                       hidden_size, dtype, self.coords.is_first_stage)

    def capture_graphs(self) -> CaptureReport | None:
        return self.graphs.capture() if self.graphs is not None else None

    def _update_sampling_states(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids.tolist():
            self.sampling_states.pop(seq_id, None)
        if not self.coords.is_sampler:
            return
        for new in plan.new_sequences:
            # A sequence is announced once; a preempted one keeps its state (and its generator's
            # position), so seeded sampling continues exactly where it was.
            if new.seq_id not in self.sampling_states:
                state = SequenceSamplingState(SamplerOptions(**new.options), new.prompt_token_ids.tolist())
                spec = state.options.grammar()
                if spec is not None:
                    state.grammar = self._grammar_state(spec, state.options.stop_token_ids)
                self.sampling_states[new.seq_id] = state

    def _grammar_state(self, spec, stop_token_ids: list[int]) -> GrammarState:
        """A fresh matcher for one sequence. The server compiled the same spec at admission, so a
        failure here is the rank's setup (no tokenizer), not the request: the row then only ends."""
        try:
            if self.grammars is None:
                raise ValueError("this rank has no tokenizer to compile grammars with")
            return GrammarState(self.grammars.compiler().compile(spec), stop_token_ids)
        except (ValueError, OSError, RuntimeError) as err:  # OSError: the tokenizer files did not load
            logger.error("structured output unavailable (%s): the request is restricted to its stop tokens", err)
            return GrammarState(None, stop_token_ids or list(self.grammars.eos_token_ids if self.grammars else []))

    def _resume_sampling_states(self, plan: StepPlan) -> None:
        """A sequence announced with outputs already (resumed on a rebuilt gang after a fault:
        actors/engine/engine_core.py, resume_on) gives its sampling state those outputs, so that
        penalties see them and its seeded stream continues at their count."""
        if not self.coords.is_sampler:
            return
        for new in plan.new_sequences:
            outputs = self.batch.token_ids(new.seq_id)[len(new.prompt_token_ids):]
            if len(outputs):
                state = self.sampling_states[new.seq_id]
                state.output_token_ids = outputs.tolist()
                state.num_sampled = len(state.output_token_ids)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, defer: bool = False) -> StepResult | PendingStep | None:
        """Runs the plan; returns the result on the sampling rank, None elsewhere. With `defer`
        (async scheduling, one rank) the sampling rank returns a PendingStep as soon as the step
        is launched: its `result()` reads the tokens."""
        started = time.time()
        self.timer.start()
        self._update_sampling_states(plan)
        inputs = self.batch.apply(plan)
        self._resume_sampling_states(plan)
        if inputs.num_seqs == 0:
            return StepResult(plan.step_id) if self.coords.is_sampler else None
        bucket = self.graphs.bucket_for(inputs.num_seqs, inputs.num_tokens) if self.graphs else None
        input_ids, positions, attn = self.input_buffers.prepare(inputs, pad_to=bucket)
        if self.coords.is_first_stage:
            self._feed_pending(inputs)
        intermediate = None
        if not self.coords.is_first_stage:
            into = self.graphs.intermediate_inputs(inputs.num_tokens) if bucket else None
            intermediate = self._recv_intermediate(inputs.num_tokens, into)
            started = time.time()  # waiting for the previous stage is not this stage's work
            self.timer.start()
        if bucket:
            out = self.graphs.replay(bucket, inputs.num_seqs)
        else:
            out = self.model(input_ids if self.coords.is_first_stage else None, positions, self.kv_caches,
                             attn, intermediate)
        if not self.coords.is_last_stage:
            self.timer.end()
            self._send_intermediate(out, copy=bucket is not None)
            return None
        pending = self._logits_and_sample(plan, inputs, out, started)
        self.timer.end()
        if pending is None or defer:
            return pending
        return pending.result()

    def _feed_pending(self, inputs: StepInputs) -> None:
        """Async scheduling: rows whose token is PENDING_TOKEN take the token the previous step
        sampled for their sequence, from the device (the host has not read it yet)."""
        flat = np.flatnonzero(inputs.token_ids == PENDING_TOKEN)
        if not len(flat):
            return
        if self._last_sampled is None:
            raise RuntimeError("a plan feeds pending tokens, but the previous step sampled none here")
        index_of, sampled = self._last_sampled
        seqs = inputs.seq_ids[np.searchsorted(inputs.query_start_loc(), flat, side="right") - 1].tolist()
        try:
            src = np.fromiter((index_of[s] for s in seqs), dtype=np.int64, count=len(seqs))
        except KeyError as err:
            raise RuntimeError(f"sequence {err.args[0]} feeds a pending token its previous step did not "
                               "sample") from None
        self.input_buffers.feed_sampled(flat, src, sampled)

    def _logits_and_sample(self, plan: StepPlan, inputs: StepInputs, hidden: torch.Tensor,
                           started: float) -> PendingStep | None:
        # Rows whose logits are needed: every position of a chunk that wants prompt logprobs,
        # else only the last position of a chunk that samples.
        rows: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (seq_id, row index into `rows`)
        plp_rows: list[tuple[int, int, int]] = []  # (chunk index, first row, count)
        offset = 0
        seq_ids, samples = inputs.seq_ids.tolist(), inputs.samples.tolist()
        for i, (n, top) in enumerate(zip(inputs.query_lens.tolist(), inputs.prompt_logprobs, strict=True)):
            if top is not None:
                plp_rows.append((i, len(rows), n))
                rows.extend(range(offset, offset + n))
                if samples[i]:
                    sample_rows.append((seq_ids[i], len(rows) - 1))
            elif samples[i]:
                sample_rows.append((seq_ids[i], len(rows)))
                rows.append(offset + n - 1)
            offset += n
        if not rows:
            return PendingStep(StepResult(plan.step_id), started) if self.coords.is_sampler else None
        logits = self.model.compute_logits(hidden[self.input_buffers.logits_indices()[0]])  # == rows
        if not self.coords.is_sampler:
            return None
        logits = logits.float()
        result = StepResult(plan.step_id)
        pending = PendingStep(result, started)
        if sample_rows:
            sampled_ids = [seq_id for seq_id, _ in sample_rows]
            states = [self.sampling_states[seq_id] for seq_id in sampled_ids]
            if len(sample_rows) == logits.shape[0]:  # decode steps: every logits row samples
                picked = logits
            else:
                index = torch.tensor([r for _, r in sample_rows])
                picked = logits[index.pin_memory().to(logits.device, non_blocking=True) if logits.is_cuda else index]
            draws = self.sampler.launch(picked, states)
            self._last_sampled = ({seq_id: i for i, seq_id in enumerate(sampled_ids)}, draws.token_ids)
            ends = inputs.seq_lens[inputs.samples].tolist()  # where each drawn token sits: after its chunk
            pending = PendingStep(result, started, draws, sampled_ids, ends, self.batch)
        for i, first, count in plp_rows:
            seq_id, start = seq_ids[i], int(inputs.start_positions[i])
            prompt = self.sampling_states[seq_id].prompt_token_ids
            # Position p predicts prompt token p + 1; the prompt's last position predicts output.
            usable = max(0, min(count, len(prompt) - 1 - start))
            if usable == 0:
                continue
            targets = prompt[start + 1: start + 1 + usable]
            entries = self.sampler.prompt_logprobs(logits[first: first + usable], targets, inputs.prompt_logprobs[i])
            result.prompt_logprobs[seq_id] = PromptLogprobs(start, entries)
        return pending

    def expert_load(self, plan: StepPlan) -> dict | None:
        """This stage's routing counts since the last report, when the plan asks and this rank
        speaks for its stage (tensor rank 0; every rank of a stage routes identically)."""
        if plan.report_expert_load and self.is_moe and self.coords.tp_rank == 0:
            return self.model.expert_load()
        return None

    @property
    def step_times(self) -> list[tuple[float, float]]:
        """(start, end) wall-clock seconds of recent steps (the device's finished ones), oldest first."""
        return self.timer.times()

    def _recv_intermediate(self, num_tokens: int, into: IntermediateTensors | None = None) -> IntermediateTensors:
        """The previous stage's hidden states and residual: into `into` (a graph's static input
        buffers) when given, else into new tensors."""
        pp = self.groups.pp
        tensors = {}
        for name in IntermediateTensors.FIELDS:
            buf = getattr(into, name) if into is not None else torch.empty(
                num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            tensors[name] = pp.recv(buf, pp.rank - 1)
        return IntermediateTensors(**tensors)

    def _send_intermediate(self, out: IntermediateTensors, copy: bool = False) -> None:
        """Sends to the next stage without waiting. `copy`: `out` is a CUDA graph's output buffer,
        which the next replay overwrites, maybe before the send has read it: send a copy."""
        pp = self.groups.pp
        for name in IntermediateTensors.FIELDS:
            tensor = getattr(out, name)
            tensor = tensor.clone() if copy else tensor.contiguous()
            self.pending.add(pp.isend(tensor, pp.rank + 1), tensor)
