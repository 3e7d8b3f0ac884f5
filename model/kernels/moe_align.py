"""Align by expert: token-expert pairs sorted by expert, each expert's run padded to the GEMM tile.

The grouped GEMMs (`strata.model.kernels.fused_moe`) give every BLOCK_M rows of the sorted order to
one program, so every tile must hold one expert's pairs only. Three launches, all on the device
(one, the layout program doing all three steps, when the pairs fit one chunk, as at decode):

    count    program c counts the experts of pairs [c*CHUNK, (c+1)*CHUNK)          -> chunk_counts [P, E]
    layout   one program: totals per expert (added to the load counters), each local expert's
             padded start, the base each chunk writes from, the expert of every tile, the number
             of used tiles, and the sentinel in each run's padding                  -> chunk_base [P, E]
    scatter  program c writes its local pairs to base + rank within the chunk       -> sorted_ids

Pair p is token p // top_k's choice p % top_k; sorted order is by expert, then by pair id (stable).
Output sizes depend only on the number of pairs and the tile, never on the routing, so the whole
step can be captured in a CUDA graph. At most min(L, pairs) local experts are non-empty, each padded
by under BLOCK_M rows. Padding rows hold the sentinel `num_pairs`; tiles past `used_tiles` (and
their rows) are left unwritten, and the GEMMs skip them. Pairs routed to experts outside
[expert_start, expert_start + L) (another rank's, under expert parallelism) are counted, not placed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_CHUNK = 128  # pairs per count/scatter program: a [CHUNK, experts] one-hot stays small
_BLOCK = 64  # rows of the layout program's loops


@dataclass(frozen=True)
class AlignedPairs:
    """The sorted layout the grouped GEMMs walk. All tensors are int32 on the pairs' device."""

    sorted_ids: torch.Tensor  # [max_rows]: pair ids by local expert, runs padded with num_pairs;
    # rows past used_tiles * block_m are unwritten
    tile_experts: torch.Tensor  # [max_tiles]: local expert (0..L-1) of each BLOCK_M rows
    used_tiles: torch.Tensor  # [1]: tiles holding pairs; the rest are skipped
    expert_ends: torch.Tensor  # [L]: where each local expert's padded run ends (grouped_mm's offsets)
    block_m: int

    @property
    def max_tiles(self) -> int:
        return self.tile_experts.shape[0]


def max_rows(num_pairs: int, num_local: int, block_m: int) -> int:
    """An upper bound of the padded rows, from static sizes only."""
    return num_pairs + min(num_local, num_pairs) * (block_m - 1)


@triton.jit
def _chunk_counts(ids_ptr, chunk, num_pairs, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """Pairs per expert among pairs [chunk * CHUNK, (chunk + 1) * CHUNK)."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=0).to(tl.int32)
    return tl.histogram(ids, E_PAD, mask=offs < num_pairs)


@triton.jit
def _place_chunk(
    ids_ptr, bases, sorted_ids_ptr, chunk, num_pairs, expert_start, num_local,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr,
):
    """Writes the chunk's local pairs at bases[expert] [E_PAD] + their rank within the chunk."""
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = offs < num_pairs
    ids = tl.load(ids_ptr + offs, mask=valid, other=-1).to(tl.int32)
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    # A pair's rank among the chunk's pairs of its expert: its column's running count, less itself.
    rank = tl.sum(tl.cumsum(onehot, 0) * onehot, 1) - 1
    base = tl.sum(onehot * bases[None, :], 1)  # bases[ids], as a one-hot product (no gather from registers)
    mine = valid & (ids >= expert_start) & (ids < expert_start + num_local)
    tl.store(sorted_ids_ptr + base + rank, offs, mask=mine)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_pairs, num_experts, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    chunk = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    counts = _chunk_counts(ids_ptr, chunk, num_pairs, CHUNK, E_PAD)
    tl.store(counts_ptr + chunk * num_experts + experts, counts, mask=experts < num_experts)


@triton.jit
def _scatter_kernel(
    ids_ptr, base_ptr, sorted_ids_ptr, num_pairs, num_experts, expert_start, num_local,
    CHUNK: tl.constexpr, E_PAD: tl.constexpr,
):
    chunk, experts = tl.program_id(0), tl.arange(0, E_PAD)
    bases = tl.load(base_ptr + chunk * num_experts + experts, mask=experts < num_experts, other=0)
    _place_chunk(ids_ptr, bases, sorted_ids_ptr, chunk, num_pairs, expert_start, num_local, CHUNK, E_PAD)


@triton.jit
def _layout_kernel(
    ids_ptr, counts_ptr, base_ptr, expert_counts_ptr, sorted_ids_ptr, tile_experts_ptr, used_tiles_ptr, ends_ptr,
    num_chunks, num_pairs, num_experts, expert_start, num_local,
    ONE_CHUNK: tl.constexpr, COUNT_LOAD: tl.constexpr, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    experts = tl.arange(0, E_PAD)
    known = experts < num_experts
    rows = tl.arange(0, BLOCK)
    if ONE_CHUNK:  # a small step (decode): this program counts and places too, one launch in all
        totals = _chunk_counts(ids_ptr, 0, num_pairs, CHUNK, E_PAD)
    else:
        totals = tl.zeros([E_PAD], dtype=tl.int32)
        for c0 in range(0, num_chunks, BLOCK):
            c = c0 + rows
            ok = (c < num_chunks)[:, None] & known[None, :]
            totals += tl.sum(tl.load(counts_ptr + c[:, None] * num_experts + experts[None, :], mask=ok, other=0), 0)
    if COUNT_LOAD:  # the load report's counters: one program, so a plain read-modify-write
        seen = tl.load(expert_counts_ptr + experts, mask=known, other=0)
        tl.store(expert_counts_ptr + experts, seen + totals.to(seen.dtype), mask=known)

    local = (experts >= expert_start) & (experts < expert_start + num_local)
    padded = tl.where(local, (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    starts = tl.cumsum(padded, 0) - padded  # where each local expert's run begins
    tl.store(used_tiles_ptr, tl.sum(padded, 0) // BLOCK_M)
    tl.store(ends_ptr + experts - expert_start, starts + padded, mask=local)

    # Chunk c writes expert e's pairs from starts[e] + (e's pairs in the chunks before c).
    if ONE_CHUNK:
        _place_chunk(ids_ptr, starts, sorted_ids_ptr, 0, num_pairs, expert_start, num_local, CHUNK, E_PAD)
    else:
        running = starts
        for c0 in range(0, num_chunks, BLOCK):
            c = c0 + rows
            at = c[:, None] * num_experts + experts[None, :]
            ok = (c < num_chunks)[:, None] & known[None, :]
            block = tl.load(counts_ptr + at, mask=ok, other=0)
            tl.store(base_ptr + at, tl.cumsum(block, 0) - block + running[None, :], mask=ok)
            running += tl.sum(block, 0)

    # Each expert writes its own tiles' expert id and its padding's sentinel: work in proportion to
    # the tiles, in parallel over experts (a balanced step needs one pass).
    first_tile, tiles = starts // BLOCK_M, padded // BLOCK_M
    mine = experts - expert_start
    for j0 in range(0, tl.max(tiles, 0), BLOCK):
        j = j0 + rows
        owner = tl.broadcast_to(mine[:, None], [E_PAD, BLOCK])
        tl.store(tile_experts_ptr + first_tile[:, None] + j[None, :], owner, mask=j[None, :] < tiles[:, None])
    pad = tl.arange(0, BLOCK_M)
    sentinel = tl.full([E_PAD, BLOCK_M], 0, tl.int32) + num_pairs
    tl.store(sorted_ids_ptr + (starts + totals)[:, None] + pad[None, :], sentinel,
             mask=pad[None, :] < (padded - totals)[:, None])


def align_by_expert(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_m: int,
    expert_start: int = 0,
    num_local: int | None = None,
    expert_counts: torch.Tensor | None = None,
) -> AlignedPairs:
    """topk_ids [T, k] (any integer dtype) -> the pairs of experts [expert_start, +num_local)
    sorted by expert and padded to `block_m`. `expert_counts` [num_experts], if given, gains the
    pairs routed to every expert (local or not). No host sync; sizes depend on T, k only."""
    num_local = num_experts if num_local is None else num_local
    if expert_start < 0 or num_local < 1 or expert_start + num_local > num_experts:
        raise ValueError(f"experts [{expert_start}, {expert_start + num_local}) outside 0..{num_experts}")
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    num_pairs, device = ids.numel(), ids.device
    rows = max_rows(num_pairs, num_local, block_m)
    sorted_ids = torch.empty(rows, dtype=torch.int32, device=device)
    tile_experts = torch.empty(triton.cdiv(rows, block_m), dtype=torch.int32, device=device)
    fresh = torch.zeros if num_pairs == 0 else torch.empty  # the layout program writes both (no memset)
    used_tiles = fresh(1, dtype=torch.int32, device=device)
    ends = fresh(num_local, dtype=torch.int32, device=device)
    aligned = AlignedPairs(sorted_ids, tile_experts, used_tiles, ends, block_m)
    if num_pairs == 0:
        return aligned
    chunks = triton.cdiv(num_pairs, _CHUNK)
    # One chunk is cut to the pairs (16 at least, for tl.cumsum): at decode a [128, experts] one-hot
    # for 8 pairs made the layout program ~11 us of a Qwen3-30B-A3B layer on an H200.
    layout_chunk = _CHUNK if chunks > 1 else max(16, triton.next_power_of_2(num_pairs))
    e_pad = triton.next_power_of_2(num_experts)
    # One chunk: the layout program counts and places itself, and needs neither buffer.
    counts = torch.empty(chunks if chunks > 1 else 0, num_experts, dtype=torch.int32, device=device)
    base = torch.empty_like(counts)
    if chunks > 1:
        _count_kernel[(chunks,)](ids, counts, num_pairs, num_experts, CHUNK=_CHUNK, E_PAD=e_pad)
    _layout_kernel[(1,)](
        ids, counts, base, expert_counts if expert_counts is not None else counts, sorted_ids, tile_experts,
        used_tiles, ends, chunks, num_pairs, num_experts, expert_start, num_local,
        ONE_CHUNK=chunks == 1, COUNT_LOAD=expert_counts is not None, BLOCK_M=block_m, E_PAD=e_pad,
        CHUNK=layout_chunk, BLOCK=_BLOCK,
    )
    if chunks > 1:
        _scatter_kernel[(chunks,)](
            ids, base, sorted_ids, num_pairs, num_experts, expert_start, num_local, CHUNK=_CHUNK, E_PAD=e_pad
        )
    return aligned
