"""Process groups as objects: who a rank is talking with, and the collectives it may call.

Every rank calls `init_rank_groups` with the same arguments but its own rank. The world group
uses NCCL on GPU (the data plane: tp all-reduce, pp hidden states) and a second, gloo group over
the same ranks carries control traffic on CPU (step plans, results, start-up facts) as msgpack
bytes over the byte channel (strata/distributed/channel.py), so no rank ever unpickles what came
over the network. Which ranks form a group is the rank layout's (strata/distributed/rank_layout.py).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from strata.distributed.rank_layout import RankCoords, ep_group_ranks, pp_group_ranks, tp_group_ranks
from strata.distributed.sockets import bind_listener

logger = logging.getLogger("strata")


class GroupCoordinator:
    """One communication group (tp, pp or ep) seen from one rank.

    With size 1 every collective is the identity and no torch.distributed group exists, so
    single-rank code pays nothing. `ranks` are global ranks in group order.
    """

    def __init__(self, ranks: list[int], my_rank: int, group: dist.ProcessGroup | None):
        self.ranks = ranks
        self.rank_in_group = ranks.index(my_rank)
        self.group = group

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def rank(self) -> int:
        return self.rank_in_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `x` along `dim`, in group order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Rows [sum(send_splits[:j]), +send_splits[j]) of `x` go to group rank j; returns the rows
        received, rank by rank. The splits are host values (each side must know what it gets), so
        a caller that counts on the device syncs once to learn them: never inside a CUDA graph."""
        if self.size == 1:
            return x
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=self.group)
        return out

    def isend(self, x: torch.Tensor, dst_in_group: int) -> dist.Work:
        return dist.isend(x, dst=self.ranks[dst_in_group], group=self.group)

    def recv(self, x: torch.Tensor, src_in_group: int) -> torch.Tensor:
        dist.recv(x, src=self.ranks[src_in_group], group=self.group)
        return x


def single_rank_group() -> GroupCoordinator:
    """The trivial group of a rank that is alone in its dimension."""
    return GroupCoordinator([0], 0, None)


@dataclass
class RankGroups:
    coords: RankCoords
    tp: GroupCoordinator
    pp: GroupCoordinator  # the ranks holding this tensor slice in every stage, in stage order
    # The MoE layers' group (whole experts per rank, tokens dispatched to them): the stage's tp
    # ranks today (rank_layout.ep_group_ranks), a communicator of its own; size 1 without EP.
    ep: GroupCoordinator
    control: dist.ProcessGroup | None  # gloo over all ranks, for msgpack bytes


def rendezvous_store(rank: int, world_size: int, master_addr: str, master_port: int,
                     timeout_s: float, listener: socket.socket | None = None) -> dist.TCPStore:
    """torch.distributed's key-value store. Rank 0 hosts it on a socket bound to the master's
    private address (`listener`, else one bound to master_addr:master_port): torch's own server
    would listen on every interface. The other ranks connect, retrying until `timeout_s`."""
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
    sock = listener or bind_listener(master_addr, master_port)
    port = sock.getsockname()[1]
    # The store takes over the file descriptor (and closes it); the Python socket lets go of it.
    return dist.TCPStore(master_addr, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach(), use_libuv=True)


def init_rank_groups(
    coords: RankCoords, master_addr: str, master_port: int, device: torch.device, timeout_s: float = 600.0,
    listener: socket.socket | None = None, expert_parallel: bool = False,
) -> RankGroups:
    """Joins the world and builds the tp, pp, ep (with `expert_parallel`) and control groups (all
    ranks, same order). Rank 0 may pass the socket it already listens on for the store (see
    `rendezvous_store`)."""
    if coords.world_size == 1:
        if listener is not None:
            listener.close()
        return RankGroups(coords, single_rank_group(), single_rank_group(), single_rank_group(), None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = rendezvous_store(coords.rank, coords.world_size, master_addr, master_port, timeout_s, listener)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=coords.rank,
        world_size=coords.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    tp_size, pp_size = coords.tp_size, coords.pp_size
    tp = pp = None
    # new_group is collective: every rank creates every group, in the same order.
    for stage in range(pp_size):
        ranks = tp_group_ranks(stage, tp_size)
        group = dist.new_group(ranks) if tp_size > 1 else None
        if stage == coords.pp_rank:
            tp = GroupCoordinator(ranks, coords.rank, group)
    for t in range(tp_size):
        ranks = pp_group_ranks(t, tp_size, pp_size)
        group = dist.new_group(ranks) if pp_size > 1 else None
        if t == coords.tp_rank:
            pp = GroupCoordinator(ranks, coords.rank, group)
    ep = GroupCoordinator([coords.rank], coords.rank, None)
    if expert_parallel and tp_size > 1:  # without EP every rank holds a slice of every expert
        for stage in range(pp_size):
            ranks = ep_group_ranks(stage, tp_size)
            group = dist.new_group(ranks)
            if stage == coords.pp_rank:
                ep = GroupCoordinator(ranks, coords.rank, group)
    control = dist.new_group(list(range(coords.world_size)), backend="gloo") if backend != "gloo" else None
    control = control or dist.group.WORLD
    logger.info("rank %d joined: %s backend, tp group %s, pp group %s, ep group %s", coords.rank, backend,
                tp.ranks, pp.ranks, ep.ranks)
    return RankGroups(coords, tp, pp, ep, control)
