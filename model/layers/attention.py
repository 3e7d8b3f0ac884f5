"""Paged attention: the per-step batch description, and the attention layer over the KV cache.

Tokens of all sequences in a step are flattened into one [T, ...] batch (vLLM style). Each layer's
cache is one tensor [2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]; a sequence's token at
position p lives in slot block_table[p // block_size] * block_size + p % block_size.

`AttentionMetadata` is backend-neutral: device tensors (in the engine, views of the model runner's
persistent input buffers, `strata.actors.worker.input_buffers`) plus the host ints a kernel launch
needs, so nothing downstream asks the device for a size. `PagedAttention` runs one layer through
an `AttentionBackend` (`strata.model.layers.attention_backend`); the backend's per-step metadata is
built once per step and shared by every layer. The default backend, "reference" (gather + SDPA),
is the CPU oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from strata.model.layers.attention_backend import AttentionBackend, QKNorm, get_attention_backend
from strata.model.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step's batch of B sequences and T new tokens.

    Integer widths follow the engine's buffers: slot_mapping int64; query_start_loc, seq_lens and
    block_tables int32. `block_tables` may be wider than the step needs (the engine's buffer has
    max_blocks_per_seq columns); columns past a sequence's blocks are never read.
    """

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] cumulative query lengths
    seq_lens: torch.Tensor  # [B] context length of each sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, W] block ids, padded with 0
    block_size: int
    max_query_len: int  # host ints, from the plan: max(query lens), max(seq_lens)
    max_seq_len: int
    _built: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and positions[T] for sequences whose new tokens start at `start_positions`.

        The plain-Python oracle (tests, the memory-profiling forward); the engine's steps go
        through `InputBuffers.prepare`, which must give the same tensors.
        """
        if not len(query_lens) == len(start_positions) == len(block_tables):
            raise ValueError("query_lens, start_positions and block_tables need one entry per sequence")
        positions: list[int] = []
        slots: list[int] = []
        for q, start, table in zip(query_lens, start_positions, block_tables, strict=True):
            if q < 1 or start < 0:
                raise ValueError(f"query length {q} must be >= 1 and start position {start} >= 0")
            if len(table) * block_size < start + q:
                raise ValueError(
                    f"block table of {len(table)} blocks of {block_size} cannot hold {start + q} tokens"
                )
            for p in range(start, start + q):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        width = max(len(t) for t in block_tables)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        cum = [0]
        for q in query_lens:
            cum.append(cum[-1] + q)
        seq_lens = [s + q for s, q in zip(start_positions, query_lens, strict=True)]

        def tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, device=device)

        meta = cls(
            slot_mapping=tensor(slots, torch.long),
            query_start_loc=tensor(cum, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(padded, torch.int32),
            block_size=block_size,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        return meta, tensor(positions, torch.long)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    def backend_metadata(self, backend: AttentionBackend) -> Any:
        """`backend`'s metadata for this step: built on first use, then shared by every layer."""
        built = self._built.get(backend.name)
        if built is None:
            built = self._built[backend.name] = backend.build_metadata(self)
        return built


class PagedAttention(nn.Module):
    """Writes this step's k/v into the paged cache, then attends causally over each sequence's cache.

    Chunked prefill is native: a sequence's queries may follow tokens cached by earlier steps.
    `sliding_window` (HF semantics) lets a query at position p see keys at positions > p - window.
    `backend` is an `AttentionBackend` or its registered name (None: the default, the reference).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        backend: AttentionBackend | str | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend if isinstance(backend, AttentionBackend) else get_attention_backend(backend)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, heads*head_dim], k/v [T, kv_heads*head_dim] -> [T, heads*head_dim]."""
        return self.backend.forward(self, q, k, v, kv_cache, attn, attn.backend_metadata(self.backend))

    def forward_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        qk_norm: QKNorm | None = None,
    ) -> torch.Tensor:
        """`forward` of q [T, heads, head_dim], k [T, kv_heads, head_dim] not yet rotated (cos, sin:
        `RotaryEmbedding.cos_sin`): the backend fuses the rotation with its cache write where it can.
        `qk_norm` (q_norm, k_norm): per-head RMSNorms before the rotation (Qwen3), fused there too."""
        metadata = attn.backend_metadata(self.backend)
        out = self.backend.forward_rotary(self, q, k, v, cos, sin, kv_cache, attn, metadata, qk_norm)
        if out is not None:
            return out
        t = q.shape[0]
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        q, k = RotaryEmbedding.apply(q, k, cos, sin)
        return self.backend.forward(self, q.reshape(t, -1), k.reshape(t, -1), v, kv_cache, attn, metadata)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"sliding_window={self.sliding_window}, backend={self.backend.name}")
