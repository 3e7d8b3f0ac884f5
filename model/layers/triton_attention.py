"""The Triton attention backend: kernels that read the paged cache through the block table.

Per layer and step, the step's keys and values go into the cache and attention runs over it:

    decode (max_query_len == 1), split-KV    the context of each sequence is cut into segments
                                             attended in parallel, then combined by the last
                                             segment to finish. Under `forward_rotary` this is
                                             the only launch: it also rotates q and k and
                                             writes k and v into the cache;
    anything else, the unified kernel        one program per (query tile, sequence, kv head).

Otherwise the cache write is a launch of its own before attention: `strata.model.kernels.
kv_cache_write`, or under `forward_rotary` the rotary kernel (q and k rotated, k and v stored).

Why split only some decode steps: the unified kernel runs num_seqs x kv_heads programs, each
walking a whole context. When that is less than one program per SM (batch 1 has 8 at Llama-8B's
shape, against 132 SMs on an H200), most of the GPU idles: on an H200 batch 1 at 8k context took
146 us unsplit and 21 us split, batch 8 about 2.8x faster split. Once the batch fills the SMs, the
split's float32 partials and their reduction cost more than they give (batch 32, 256 programs:
84 us unified against 91 us split at 2k context), so `split_kv="auto"` splits only below one wave.
In those steps the rotary kernel's own launch (~2 us at batch 1, one per layer) is folded into the split's,
and so are Qwen3's q/k norms (two launches a layer).

Nothing here synchronises with the device: launches are sized by the metadata's host ints. The
split's float32 scratch and its int32 counters (zero between launches: the kernel re-arms them)
live on the backend instance (one buffer each per device), grown only when a larger step arrives
and otherwise reused, so a CUDA graph replays the same addresses; the runner's
eager warm-up before capture does any growing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from strata.model.kernels import interpreting, triton_available
from strata.model.layers.attention_backend import AttentionBackend, QKNorm

if triton_available():
    from strata.model.kernels.kv_cache_write import write_kv_cache
    from strata.model.kernels.paged_attention import unified_attention
    from strata.model.kernels.rotary import apply_rotary_to_cache
    from strata.model.kernels.split_kv_attention import (
        qk_norm_fits,
        split_kv_attention,
        split_kv_attention_rotary,
        split_kv_scratch_numel,
    )

if TYPE_CHECKING:
    from strata.model.kernels.split_kv_attention import QKNormWeights
    from strata.model.layers.attention import AttentionMetadata, PagedAttention

# Split-KV aims at this many programs per SM; within the split, 2, 4 or 8 per SM and segments of
# 128 to 512 tokens ran the same on an H200 (Llama-8B shape, bf16, batch 1 to 64).
PROGRAMS_PER_SM = 4


@dataclass
class TritonMetadata:
    """One step's launch choices, shared by every layer; the kernels read the step's tensors straight
    from `AttentionMetadata`, so there is nothing to build on the device."""

    decode_only: bool  # max_query_len == 1: the split-KV path may run
    segments: dict[int, int] = field(default_factory=dict)  # kv_heads -> segments (0: unified kernel)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs one program at a time


def _plan_segments(num_seqs: int, kv_heads: int, max_seq_len: int, sm_count: int, max_segments: int,
                   min_segment_tokens: int) -> int:
    """Segments per sequence: enough to give each SM PROGRAMS_PER_SM programs, but no segment shorter
    than `min_segment_tokens` of the longest context, and at most `max_segments`."""
    by_length = -(-max_seq_len // min_segment_tokens)
    by_occupancy = -(-PROGRAMS_PER_SM * sm_count // max(1, num_seqs * kv_heads))
    return max(1, min(max_segments, by_length, by_occupancy))


def _fusable_norm_weights(qk_norm: QKNorm | None, q: torch.Tensor) -> QKNormWeights | None:
    """(q weight, k weight, eps) when the split-KV launch can apply `qk_norm` itself (one eps, weights
    `qk_norm_fits`), else None."""
    if qk_norm is None:
        return None
    q_norm, k_norm = qk_norm
    if q_norm.eps != k_norm.eps or not qk_norm_fits(q, q_norm.weight, k_norm.weight):
        return None
    return q_norm.weight, k_norm.weight, float(q_norm.eps)


class TritonBackend(AttentionBackend):
    """Paged attention in Triton, on CUDA (and on CPU under TRITON_INTERPRET=1, for tests).

    split_kv: "auto" splits decode steps when it fills the GPU better, "always" takes the split
    path for every decode step (even with one segment), "never" keeps the unified kernel.
    `sm_count` overrides the device's (tests and benchmarks use it to force several segments).
    """

    name = "triton"
    supports_cuda_graphs = True  # grids depend on host ints only; scratch addresses stay valid

    def __init__(
        self,
        split_kv: Literal["auto", "always", "never"] = "auto",
        max_segments: int = 64,
        min_segment_tokens: int = 256,
        sm_count: int | None = None,
    ):
        self.split_kv = split_kv
        self.max_segments = max_segments
        self.min_segment_tokens = min_segment_tokens
        self.sm_count = sm_count
        # The split's float32 partials and its int32 counters (zero between calls), per device.
        self._scratch: dict[tuple[str, torch.device], torch.Tensor] = {}
        # Outgrown buffers stay alive: a CUDA graph captured earlier still reads and writes them.
        self._retired: list[torch.Tensor] = []

    def supports(self, device: torch.device) -> bool:
        if not triton_available():
            return False
        return device.type == "cuda" or (device.type == "cpu" and interpreting())

    def build_metadata(self, attn: AttentionMetadata) -> TritonMetadata:
        return TritonMetadata(decode_only=attn.max_query_len == 1)

    def forward(
        self,
        layer: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        metadata: TritonMetadata,
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, attn.slot_mapping)
        return self._attend(layer, q, kv_cache, attn, metadata)

    def forward_rotary(self, layer, q, k, v, cos, sin, kv_cache, attn, metadata, qk_norm=None) -> torch.Tensor | None:
        t = q.shape[0]
        v = v.unflatten(-1, (layer.num_kv_heads, layer.head_dim))
        segments = self._segments(metadata, attn, layer.num_kv_heads, q.device)
        norm_weights = _fusable_norm_weights(qk_norm, q) if segments else None
        if segments and (qk_norm is None or norm_weights):  # norms, rotation and cache write ride in attention
            return split_kv_attention_rotary(q, k, v, cos, sin, kv_cache, attn.slot_mapping, attn.query_start_loc,
                                             attn.seq_lens, attn.block_tables, layer.scale, layer.sliding_window,
                                             segments, *self._split_buffers(layer, attn, segments, q.device),
                                             qk_norm=norm_weights)
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q = apply_rotary_to_cache(q, k, v, cos, sin, kv_cache, attn.slot_mapping)
        return self._attend(layer, q.view(t, -1), kv_cache, attn, metadata)

    def _attend(self, layer: PagedAttention, q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata,
                metadata: TritonMetadata) -> torch.Tensor:
        """Attention over the cache, this step's keys and values already in it."""
        segments = self._segments(metadata, attn, layer.num_kv_heads, q.device)
        if segments:
            return split_kv_attention(q, kv_cache, attn.query_start_loc, attn.seq_lens, attn.block_tables,
                                      layer.scale, layer.sliding_window, segments,
                                      *self._split_buffers(layer, attn, segments, q.device))
        return unified_attention(q, kv_cache, attn.query_start_loc, attn.seq_lens, attn.block_tables,
                                 layer.scale, layer.sliding_window, attn.max_query_len)

    def _split_buffers(self, layer: PagedAttention, attn: AttentionMetadata, segments: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 scratch, int32 counters) for a split-KV launch of this layer's shape."""
        numel = split_kv_scratch_numel(attn.num_seqs, layer.num_heads, layer.head_dim, segments)
        return (self._scratch_buffer(device, numel),
                self._scratch_buffer(device, attn.num_seqs * layer.num_kv_heads, torch.int32))

    def _segments(self, metadata: TritonMetadata, attn: AttentionMetadata, kv_heads: int,
                  device: torch.device) -> int:
        """Segments of the split-KV path for this step, or 0 for the unified kernel."""
        if not metadata.decode_only or self.split_kv == "never":
            return 0
        segments = metadata.segments.get(kv_heads)
        if segments is None:
            sm_count = self.sm_count or _sm_count(device)
            segments = _plan_segments(attn.num_seqs, kv_heads, attn.max_seq_len, sm_count, self.max_segments,
                                      self.min_segment_tokens)
            fills_gpu = attn.num_seqs * kv_heads >= sm_count  # the unified kernel has a full wave
            if self.split_kv == "auto" and (segments == 1 or fills_gpu):
                segments = 0
            metadata.segments[kv_heads] = segments
        return segments

    def _scratch_buffer(self, device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A zeroed buffer of at least `numel` elements, kept per (dtype, device) and grown geometrically."""
        key = (str(dtype), device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            if buf is not None:
                self._retired.append(buf)
                numel = max(numel, 2 * buf.numel())  # grow geometrically: few retired buffers
            buf = self._scratch[key] = torch.zeros(numel, dtype=dtype, device=device)
        return buf
