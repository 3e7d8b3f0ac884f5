"""Expert parallelism: how a MoE layer's tokens reach the ranks of their experts and come back.

Each rank of the EP group (`ModelContext.ep`) holds a contiguous range of whole experts. Two ways
to run them, chosen per step from host-side sizes (`choose_dispatch`):

    allgather: every EP rank has every token. With dp_size = 1 that needs no collective at all:
        attention's output is replicated by the tp all-reduce before the router, so the gather is
        the identity. Each rank computes its experts' pairs of all tokens, and one all-reduce
        (a reduce-scatter + all-gather) sums the partials. Sizes are static: capturable.
    alltoall: rank r speaks for tokens [r*S, (r+1)*S), S = ceil(T / ep). It sends the rows of
        those tokens' pairs to the ranks of their experts (all_to_all_single), each rank runs the
        rows it got, the results go back the same way, the home rank weights and sums them per
        token, and one all-gather gives every rank every token again. The split sizes are host
        values, so the counts are read once per layer: a device sync, never inside a CUDA graph.

Bytes per rank for T tokens of H values, top-k routing over ep ranks: allgather's all-reduce moves
2 (ep-1)/ep T H; alltoall moves (ep-1)/ep T H (2k/ep + 1) (rows out and back, then the all-gather),
fewer only when ep > 2k. With data parallelism (ranks holding different tokens) the gather stops
being free and alltoall becomes the way to go; then every EP rank must also agree on the mode
(today they do: T is the same on all of them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from strata.config import EpDispatch
from strata.distributed.process_groups import GroupCoordinator

if TYPE_CHECKING:
    from strata.model.layers.moe import FusedMoE

DispatchMode = Literal["allgather", "alltoall"]


def choose_dispatch(
    mode: EpDispatch, num_tokens: int, ep_size: int, top_k: int, alltoall_min_tokens: int, on_cuda: bool
) -> DispatchMode:
    """The mode of this step's MoE layers, from host values only (see the module docstring)."""
    if ep_size == 1:
        return "allgather"  # nothing to dispatch: the rank holds every expert
    if on_cuda and torch.cuda.is_current_stream_capturing():
        return "allgather"  # a graph cannot hold a host read of the split sizes
    if mode == "auto":
        fewer_bytes = ep_size > 2 * top_k
        return "alltoall" if fewer_bytes and num_tokens >= alltoall_min_tokens else "allgather"
    return mode


def home_tokens(num_tokens: int, ep: GroupCoordinator) -> tuple[int, int, int]:
    """(first, end, share): the tokens this EP rank speaks for under alltoall, and the padded
    share every rank's slice is gathered at (the last ranks may hold fewer, or none)."""
    share = -(-num_tokens // ep.size)
    return min(num_tokens, ep.rank * share), min(num_tokens, (ep.rank + 1) * share), share


def all_to_all_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts: FusedMoE,
    ep: GroupCoordinator,
) -> torch.Tensor:
    """x [T, H] and its routing [T, k], the same on every EP rank -> the routed experts' full sum
    [T, H], the same on every EP rank. Does not count the pairs (the caller counts all of them)."""
    num_tokens, k = topk_ids.shape
    first, end, share = home_tokens(num_tokens, ep)
    pair_ids = topk_ids[first:end].reshape(-1)
    # Sorted by expert, hence by destination rank (experts sit on ranks in contiguous ranges);
    # stable, so a token's pairs are summed in expert order, as the reference sums them.
    order = torch.argsort(pair_ids, stable=True)
    sorted_ids = pair_ids[order]
    dest = sorted_ids // experts.num_local
    send = torch.zeros(ep.size, dtype=torch.long, device=x.device)
    send.index_add_(0, dest, torch.ones_like(dest))
    recv = ep.all_to_all(send, [1] * ep.size, [1] * ep.size)
    send_splits, recv_splits = torch.stack([send, recv]).tolist()  # the one host sync
    tokens = order // k  # home pair -> its token, within the home slice
    rows = ep.all_to_all(x[first + tokens], send_splits, recv_splits)
    row_ids = ep.all_to_all(sorted_ids, send_splits, recv_splits)
    ones = torch.ones(rows.shape[0], 1, dtype=topk_weights.dtype, device=x.device)
    done = experts(rows, ones, row_ids.unsqueeze(1), count=False)  # each row is one pair
    back = ep.all_to_all(done, recv_splits, send_splits)
    # The routing weight rounded to the dtype before it multiplies, as the reference does.
    back *= topk_weights[first:end].reshape(-1)[order].to(back.dtype).unsqueeze(-1)
    home = x.new_zeros(share, x.shape[1]).index_add_(0, tokens, back)
    return ep.all_gather(home, dim=0)[:num_tokens]
