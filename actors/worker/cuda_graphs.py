"""CUDA graphs of decode steps: one graph per batch-size bucket, replayed instead of the eager forward.

A decode step of an 8B model launches hundreds of small kernels, and the GPU machine's CPU spends
~9 us on each launch: eagerly the GPU waits on the host. A graph launches the whole forward at once.

Each graph is captured over the persistent input buffers' fixed views (`InputBuffers.decode_views`:
block tables at full width, `max_seq_len` = the model length), so every kernel's grid is the same at
every replay and only the buffers' contents change. A step of B sequences replays the smallest
bucket >= B, with rows B.. padded (slot -1: no cache write; length 0: no keys). Prefill and mixed
steps run eagerly, as vLLM does.

Graphs share one memory pool and are captured largest first, so the smaller ones reuse its blocks.
With tensor parallelism the NCCL all-reduce is captured inside the graph: the communicator already
exists (bring-up ran collectives on it), and `torch.cuda.graph` captures on a side stream.
Pipeline stages after the first read their input from static intermediate buffers the runner
receives into before the replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from strata.actors.worker.input_buffers import InputBuffers
from strata.model.architectures.intermediate import IntermediateTensors

logger = logging.getLogger("strata")


def graph_batch_sizes(max_num_seqs: int, sizes: list[int] | None = None) -> list[int]:
    """The buckets, ascending, capped at max_num_seqs: the asked sizes, else 1, 2, 4, 8, 16, 24, 32
    and every 16 after; max_num_seqs itself is always one, so every decode batch has a graph."""
    if sizes is None:
        sizes = [1, 2, 4, 8, 16, 24, 32, *range(48, max_num_seqs + 1, 16)]
    return sorted({s for s in sizes if s <= max_num_seqs} | {max_num_seqs})


@dataclass
class CaptureReport:
    sizes: list[int]
    seconds: float
    memory_bytes: int


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    output: torch.Tensor | IntermediateTensors


class DecodeGraphs:
    """The captured graphs of one rank's model shard."""

    def __init__(self, model, kv_caches: list[torch.Tensor], buffers: InputBuffers, sizes: list[int],
                 max_seq_len: int, hidden_size: int, dtype: torch.dtype, is_first_stage: bool):
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.sizes = sorted(sizes)
        self.max_seq_len = max_seq_len
        self._graphs: dict[int, _Graph] = {}
        # A later stage's input, at a fixed address: the runner receives the previous stage's
        # hidden states and residual here before a replay.
        self.intermediate: IntermediateTensors | None = None
        if not is_first_stage:
            largest = self.sizes[-1]
            device = buffers.device
            self.intermediate = IntermediateTensors(
                *(torch.zeros(largest, hidden_size, dtype=dtype, device=device) for _ in IntermediateTensors.FIELDS))

    def bucket_for(self, num_seqs: int, num_tokens: int) -> int | None:
        """The graph a step runs in: a decode step (one token per sequence) of at most the largest
        bucket; None: run it eagerly."""
        if num_tokens != num_seqs or not self._graphs or num_seqs > self.sizes[-1]:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def intermediate_inputs(self, size: int) -> IntermediateTensors:
        assert self.intermediate is not None
        return IntermediateTensors(*(getattr(self.intermediate, name)[:size] for name in IntermediateTensors.FIELDS))

    def _forward(self, size: int):
        """One forward over the bucket's fixed views. Every call builds fresh attention metadata,
        so the backend's per-step metadata is computed inside the capture, not cached from the
        warm-up run."""
        input_ids, positions, attn = self.buffers.decode_views(size, self.max_seq_len)
        intermediate = self.intermediate_inputs(size) if self.intermediate is not None else None
        return self.model(input_ids, positions, self.kv_caches, attn, intermediate)

    @torch.inference_mode()
    def capture(self) -> CaptureReport:
        started = time.time()
        free_before = torch.cuda.mem_get_info(self.buffers.device)[0]
        self.buffers.reset_decode_padding(self.sizes[-1])
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: lazy allocations and kernel compilation happen outside capture
            torch.cuda.synchronize(self.buffers.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                output = self._forward(size)
            self._graphs[size] = _Graph(graph, output)
        torch.cuda.synchronize(self.buffers.device)
        used = max(0, free_before - torch.cuda.mem_get_info(self.buffers.device)[0])
        return CaptureReport(list(self.sizes), time.time() - started, used)

    def replay(self, size: int, num_seqs: int) -> torch.Tensor | IntermediateTensors:
        """Runs the bucket's graph on what the buffers hold now; the output's first `num_seqs` rows."""
        entry = self._graphs[size]
        entry.graph.replay()
        out = entry.output
        if isinstance(out, torch.Tensor):
            return out[:num_seqs]
        return IntermediateTensors(*(getattr(out, name)[:num_seqs] for name in IntermediateTensors.FIELDS))
