"""The reference attention backend: gather each sequence's cached keys into a padded batch, one SDPA.

Exact on CPU and GPU (the CPU oracle the parity tests hold to Hugging Face), not fast: every layer
gathers [B, max_seq_len] keys and values. Nothing here synchronises with the device: the padded
sizes are the metadata's host ints (`max_query_len`, `max_seq_len`, `num_tokens`), and every index
is computed on the device (`repeat_interleave` is given its output size, so it does not ask the
device for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from strata.model.layers.attention_backend import AttentionBackend

if TYPE_CHECKING:
    from strata.model.layers.attention import AttentionMetadata, PagedAttention


@dataclass
class PaddedLayout:
    """Where each flat token sits in the padded [B, max_q] query grid; shared by all layers of a step."""

    seq_of_token: torch.Tensor  # [T]
    row_of_token: torch.Tensor  # [T]
    query_pos: torch.Tensor  # [B, max_q] absolute position of each query row
    query_valid: torch.Tensor  # [B, max_q]
    key_slots: torch.Tensor  # [B, max_ctx] flat cache slot of each key position
    key_valid: torch.Tensor  # [B, max_ctx]


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def build_metadata(self, attn: AttentionMetadata) -> PaddedLayout:
        device = attn.seq_lens.device
        num_tokens, block_size = attn.num_tokens, attn.block_size
        max_q, max_ctx = attn.max_query_len, attn.max_seq_len
        qsl = attn.query_start_loc.long()
        seq_lens = attn.seq_lens.long()
        query_lens = qsl[1:] - qsl[:-1]
        seq_of_token = torch.repeat_interleave(query_lens, output_size=num_tokens)
        row_of_token = torch.arange(num_tokens, device=device) - qsl[seq_of_token]
        rows = torch.arange(max_q, device=device)
        query_pos = (seq_lens - query_lens)[:, None] + rows[None, :]
        query_valid = rows[None, :] < query_lens[:, None]
        keys = torch.arange(max_ctx, device=device)
        block_idx = (keys // block_size).clamp(max=attn.block_tables.shape[1] - 1)
        blocks = attn.block_tables[:, block_idx].long()  # [B, max_ctx]
        key_slots = blocks * block_size + (keys % block_size)[None, :]
        key_valid = keys[None, :] < seq_lens[:, None]
        return PaddedLayout(seq_of_token, row_of_token, query_pos, query_valid, key_slots, key_valid)

    def forward(
        self,
        layer: PagedAttention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
        metadata: PaddedLayout,
    ) -> torch.Tensor:
        heads, kv_heads, head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        num_tokens = q.shape[0]
        k_flat = kv_cache[0].view(-1, kv_heads, head_dim)
        v_flat = kv_cache[1].view(-1, kv_heads, head_dim)
        k_flat[attn.slot_mapping] = k.view(num_tokens, kv_heads, head_dim).to(k_flat.dtype)
        v_flat[attn.slot_mapping] = v.view(num_tokens, kv_heads, head_dim).to(v_flat.dtype)

        lay = metadata
        batch, max_q = lay.query_pos.shape
        qp = q.new_zeros(batch, max_q, heads, head_dim)
        qp[lay.seq_of_token, lay.row_of_token] = q.view(num_tokens, heads, head_dim)
        # Unused cache slots may hold NaN (torch.empty); a masked NaN still poisons softmax @ V.
        hidden = ~lay.key_valid[:, :, None, None]
        keys = k_flat[lay.key_slots].masked_fill(hidden, 0).to(q.dtype)
        values = v_flat[lay.key_slots].masked_fill(hidden, 0).to(q.dtype)
        groups = heads // kv_heads
        if groups > 1:
            keys = keys.repeat_interleave(groups, dim=2)
            values = values.repeat_interleave(groups, dim=2)

        key_pos = torch.arange(keys.shape[1], device=q.device)
        qpos = lay.query_pos[:, :, None]
        mask = (key_pos[None, None, :] <= qpos) & lay.key_valid[:, None, :]
        if layer.sliding_window is not None:
            mask &= key_pos[None, None, :] > qpos - layer.sliding_window
        mask |= ~lay.query_valid[:, :, None]  # padding rows: anything finite, they are dropped below
        out = F.scaled_dot_product_attention(
            qp.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=mask[:, None],
            scale=layer.scale,
        )  # [B, heads, max_q, head_dim]
        out = out.transpose(1, 2)[lay.seq_of_token, lay.row_of_token]
        return out.reshape(num_tokens, heads * head_dim)
