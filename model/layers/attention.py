"""Paged attention: the per-step batch description, and the reference attention over the KV cache.

Tokens of all sequences in a step are flattened into one [T, ...] batch (vLLM style). Each layer's
cache is one tensor [2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]; a sequence's token at
position p lives in slot block_table[p // block_size] * block_size + p % block_size.

The reference implementation here gathers every sequence's cached keys into a padded batch and makes
one SDPA call with a boolean mask. It is correct on CPU and GPU; a faster GPU kernel can replace it
behind the same `PagedAttention.forward` and `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class _PaddedLayout:
    """Where each flat token sits in the padded [B, max_q] query grid; shared by all layers of a step."""

    seq_of_token: torch.Tensor  # [T]
    row_of_token: torch.Tensor  # [T]
    query_pos: torch.Tensor  # [B, max_q] absolute position of each query row
    query_valid: torch.Tensor  # [B, max_q]
    key_slots: torch.Tensor  # [B, max_ctx] flat cache slot of each key position
    key_valid: torch.Tensor  # [B, max_ctx]


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step's batch of B sequences and T new tokens."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    query_start_loc: torch.Tensor  # [B+1] cumulative query lengths
    seq_lens: torch.Tensor  # [B] context length of each sequence after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] block ids, padded with 0
    block_size: int
    _layout: _PaddedLayout | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        start_positions: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> tuple[AttentionMetadata, torch.Tensor]:
        """Metadata and positions[T] for sequences whose new tokens start at `start_positions`."""
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

        def as_long(x: list) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        meta = cls(
            slot_mapping=as_long(slots),
            query_start_loc=as_long(cum),
            seq_lens=as_long([s + q for s, q in zip(start_positions, query_lens, strict=True)]),
            block_tables=as_long(padded),
            block_size=block_size,
        )
        return meta, as_long(positions)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def padded_layout(self) -> _PaddedLayout:
        """Computed on first use and reused by every layer of the step (costs one host sync)."""
        if self._layout is None:
            self._layout = self._compute_layout()
        return self._layout

    def _compute_layout(self) -> _PaddedLayout:
        device = self.seq_lens.device
        query_lens = self.query_start_loc[1:] - self.query_start_loc[:-1]
        max_q, max_ctx = int(query_lens.max()), int(self.seq_lens.max())
        seq_of_token = torch.repeat_interleave(torch.arange(self.num_seqs, device=device), query_lens)
        row_of_token = torch.arange(seq_of_token.numel(), device=device) - self.query_start_loc[seq_of_token]
        rows = torch.arange(max_q, device=device)
        query_pos = (self.seq_lens - query_lens)[:, None] + rows[None, :]
        query_valid = rows[None, :] < query_lens[:, None]
        keys = torch.arange(max_ctx, device=device)
        block_idx = (keys // self.block_size).clamp(max=self.block_tables.shape[1] - 1)
        blocks = self.block_tables[:, block_idx]  # [B, max_ctx]
        key_slots = blocks * self.block_size + (keys % self.block_size)[None, :]
        key_valid = keys[None, :] < self.seq_lens[:, None]
        return _PaddedLayout(seq_of_token, row_of_token, query_pos, query_valid, key_slots, key_valid)


class PagedAttention(nn.Module):
    """Writes this step's k/v into the paged cache, then attends causally over each sequence's cache.

    Chunked prefill is native: a sequence's queries may follow tokens cached by earlier steps.
    `sliding_window` (HF semantics) lets a query at position p see keys at positions > p - window.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, heads*head_dim], k/v [T, kv_heads*head_dim] -> [T, heads*head_dim]."""
        num_tokens = q.shape[0]
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        k_flat[attn.slot_mapping] = k.view(num_tokens, self.num_kv_heads, self.head_dim).to(k_flat.dtype)
        v_flat[attn.slot_mapping] = v.view(num_tokens, self.num_kv_heads, self.head_dim).to(v_flat.dtype)

        lay = attn.padded_layout()
        batch, max_q = lay.query_pos.shape
        qp = q.new_zeros(batch, max_q, self.num_heads, self.head_dim)
        qp[lay.seq_of_token, lay.row_of_token] = q.view(num_tokens, self.num_heads, self.head_dim)
        # Unused cache slots may hold NaN (torch.empty); a masked NaN still poisons softmax @ V.
        hidden = ~lay.key_valid[:, :, None, None]
        keys = k_flat[lay.key_slots].masked_fill(hidden, 0).to(q.dtype)
        values = v_flat[lay.key_slots].masked_fill(hidden, 0).to(q.dtype)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=2)
            values = values.repeat_interleave(groups, dim=2)

        key_pos = torch.arange(keys.shape[1], device=q.device)
        qpos = lay.query_pos[:, :, None]
        mask = (key_pos[None, None, :] <= qpos) & lay.key_valid[:, None, :]
        if self.sliding_window is not None:
            mask &= key_pos[None, None, :] > qpos - self.sliding_window
        mask |= ~lay.query_valid[:, :, None]  # padding rows: anything finite, they are dropped below
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask[:, None],
            scale=self.scale,
        )  # [B, heads, max_q, head_dim]
        out = out.transpose(1, 2)[lay.seq_of_token, lay.row_of_token]
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
