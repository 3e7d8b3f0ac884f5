"""Runs one StepPlan on this rank's shard: plan -> tensors -> forward -> (last stage) logits -> sample.

The same code runs on every rank; what a rank does depends on its coordinates: the first stage
embeds tokens, other stages receive hidden states from the previous stage, the last stage
computes logits, and only the sampling rank (tensor rank 0 of the last stage) samples.
"""

from __future__ import annotations

import collections
import time

import torch

from strata.distributed.channel import PendingSends
from strata.distributed.process_groups import RankGroups
from strata.distributed.step_plan import PromptLogprobs, SampledResult, SamplerOptions, StepPlan, StepResult
from strata.model.layers.attention import AttentionMetadata
from strata.model.sampler import Sampler, SequenceSamplingState


class ModelRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], groups: RankGroups, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.groups = groups
        self.coords = groups.coords
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        self.sampler = Sampler()
        self.sampling_states: dict[int, SequenceSamplingState] = {}
        # (start, end) of each step's compute, from its inputs' arrival to its outputs' sending,
        # so tests can check that pipeline stages overlap. Bounded: only recent steps are kept.
        self.step_times: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)
        self.pending = PendingSends()
        self.is_moe = hasattr(model, "expert_load")

    def _update_sampling_states(self, plan: StepPlan) -> None:
        for seq_id in plan.finished_seq_ids:
            self.sampling_states.pop(seq_id, None)
        if not self.coords.is_sampler:
            return
        for new in plan.new_sequences:
            # A preempted sequence keeps its state (and its generator's position), so seeded
            # sampling continues exactly where it was.
            if new.seq_id not in self.sampling_states:
                self.sampling_states[new.seq_id] = SequenceSamplingState(
                    SamplerOptions(**new.options), list(new.prompt_token_ids)
                )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult | None:
        """Runs the plan; returns the result on the sampling rank, None elsewhere."""
        started = time.time()
        self._update_sampling_states(plan)
        if not plan.chunks:
            return StepResult(plan.step_id) if self.coords.is_sampler else None
        query_lens = [len(c.token_ids) for c in plan.chunks]
        attn, positions = AttentionMetadata.build(
            query_lens, [c.start_pos for c in plan.chunks], [c.block_table for c in plan.chunks],
            self.block_size, self.device,
        )
        input_ids = None
        intermediate = None
        if self.coords.is_first_stage:
            flat = [t for c in plan.chunks for t in c.token_ids]
            input_ids = torch.tensor(flat, dtype=torch.long, device=self.device)
        else:
            intermediate = self._recv_intermediate(sum(query_lens))
            started = time.time()  # waiting for the previous stage is not this stage's work
        out = self.model(input_ids, positions, self.kv_caches, attn, intermediate)
        if not self.coords.is_last_stage:
            if out["hidden_states"].is_cuda:
                torch.cuda.current_stream().synchronize()  # so the interval covers the compute
            self.step_times.append((started, time.time()))
            self._send_intermediate(out)
            return None
        result = self._logits_and_sample(plan, out, query_lens)
        self.step_times.append((started, time.time()))
        if result is not None:
            result.step_seconds = time.time() - started
        return result

    def _logits_and_sample(self, plan: StepPlan, hidden: torch.Tensor, query_lens: list[int]):
        # Rows whose logits are needed: every position of a chunk that wants prompt logprobs,
        # else only the last position of a chunk that samples.
        rows: list[int] = []
        sample_rows: list[tuple[int, int]] = []  # (seq_id, row index into `rows`)
        plp_rows: list[tuple[int, int, int]] = []  # (chunk index, first row, count)
        offset = 0
        for i, (chunk, n) in enumerate(zip(plan.chunks, query_lens, strict=True)):
            if chunk.prompt_logprobs is not None:
                plp_rows.append((i, len(rows), n))
                rows.extend(range(offset, offset + n))
                if chunk.samples:
                    sample_rows.append((chunk.seq_id, len(rows) - 1))
            elif chunk.samples:
                sample_rows.append((chunk.seq_id, len(rows)))
                rows.append(offset + n - 1)
            offset += n
        if not rows:
            return StepResult(plan.step_id) if self.coords.is_sampler else None
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        if not self.coords.is_sampler:
            return None
        logits = logits.float()
        result = StepResult(plan.step_id)
        if sample_rows:
            states = [self.sampling_states[seq_id] for seq_id, _ in sample_rows]
            picked = logits[torch.tensor([r for _, r in sample_rows], device=logits.device)]
            for (seq_id, _), state, tok in zip(sample_rows, states, self.sampler.sample(picked, states),
                                               strict=True):
                state.output_token_ids.append(tok.token_id)
                result.sampled[seq_id] = SampledResult(tok.token_id, tok.logprob, tok.rank, tok.top_logprobs)
        for chunk_idx, first, count in plp_rows:
            chunk = plan.chunks[chunk_idx]
            prompt = self.sampling_states[chunk.seq_id].prompt_token_ids
            # Position p predicts prompt token p + 1; the prompt's last position predicts output.
            usable = max(0, min(count, len(prompt) - 1 - chunk.start_pos))
            if usable == 0:
                continue
            targets = prompt[chunk.start_pos + 1: chunk.start_pos + 1 + usable]
            entries = self.sampler.prompt_logprobs(logits[first: first + usable], targets, chunk.prompt_logprobs)
            result.prompt_logprobs[chunk.seq_id] = PromptLogprobs(chunk.start_pos, entries)
        return result

    def expert_load(self, plan: StepPlan) -> dict | None:
        """This stage's routing counts since the last report, when the plan asks and this rank
        speaks for its stage (tensor rank 0; every rank of a stage routes identically)."""
        if plan.report_expert_load and self.is_moe and self.coords.tp_rank == 0:
            return self.model.expert_load()
        return None

    def _recv_intermediate(self, num_tokens: int) -> dict[str, torch.Tensor]:
        pp = self.groups.pp
        tensors = {}
        for name in ("hidden_states", "residual"):
            buf = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
            tensors[name] = pp.recv(buf, pp.rank - 1)
        return tensors

    def _send_intermediate(self, out: dict[str, torch.Tensor]) -> None:
        pp = self.groups.pp
        for name in ("hidden_states", "residual"):
            tensor = out[name].contiguous()
            self.pending.add(pp.isend(tensor, pp.rank + 1), tensor)
