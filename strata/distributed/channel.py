"""torch.distributed bring-up for one rank, and the typed byte channel the ranks talk over.

Every rank calls `init_rank_groups` with the same arguments but its own rank. The world group
uses NCCL on GPU (the data plane: tp all-reduce, pp hidden states) and a second, gloo group over
the same ranks carries control traffic on CPU (step plans, results, start-up facts) as msgpack
bytes, so no rank ever unpickles what came over the network.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

from strata.actors.nodes.node_address import bind_listener
from strata.distributed.process_groups import GroupCoordinator, RankCoords, global_rank, single_rank_group

logger = logging.getLogger("strata")


@dataclass
class RankGroups:
    coords: RankCoords
    tp: GroupCoordinator
    pp: GroupCoordinator  # the ranks holding this tensor slice in every stage, in stage order
    control: dist.ProcessGroup | None  # gloo over all ranks, for msgpack bytes


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
    listener: socket.socket | None = None,
) -> RankGroups:
    """Joins the world and builds the tp, pp and control groups (all ranks, same order).
    Rank 0 may pass the socket it already listens on for the store (see `rendezvous_store`)."""
    if coords.world_size == 1:
        if listener is not None:
            listener.close()
        return RankGroups(coords, single_rank_group(), single_rank_group(), None)
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
        ranks = [global_rank(stage, t, tp_size) for t in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if stage == coords.pp_rank:
            tp = GroupCoordinator(ranks, coords.rank, group)
    for t in range(tp_size):
        ranks = [global_rank(s, t, tp_size) for s in range(pp_size)]
        group = dist.new_group(ranks) if pp_size > 1 else None
        if t == coords.tp_rank:
            pp = GroupCoordinator(ranks, coords.rank, group)
    control = dist.new_group(list(range(coords.world_size)), backend="gloo") if backend != "gloo" else None
    control = control or dist.group.WORLD
    logger.info("rank %d joined: %s backend, tp group %s, pp group %s", coords.rank, backend, tp.ranks, pp.ranks)
    return RankGroups(coords, tp, pp, control)


class PendingSends:
    """Sends in flight. A sender never waits for its receiver (a pipeline stage must go on to the
    next micro-batch); the works and their buffers are kept until they complete."""

    def __init__(self, keep: int = 64):
        self._works: list[tuple[dist.Work, object]] = []
        self._keep = keep

    def add(self, work: dist.Work, buffers: object) -> None:
        self._works.append((work, buffers))
        while len(self._works) > self._keep:  # the receiver consumed these long ago
            self._works.pop(0)[0].wait()

    def wait_all(self) -> None:
        for work, _ in self._works:
            work.wait()
        self._works.clear()


def isend_bytes(data: bytes, dst: int, group: dist.ProcessGroup, pending: PendingSends) -> None:
    size = torch.tensor([len(data)], dtype=torch.int64)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    pending.add(dist.isend(size, dst=dst, group=group), size)
    pending.add(dist.isend(payload, dst=dst, group=group), payload)


def recv_bytes(src: int, group: dist.ProcessGroup) -> bytes:
    size = torch.empty(1, dtype=torch.int64)
    dist.recv(size, src=src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.recv(buf, src=src, group=group)
    return buf.numpy().tobytes()


def all_gather_msgpack(obj, group: dist.ProcessGroup | None, world_size: int) -> list:
    """Every rank's `obj` (msgpack-able), in rank order."""
    if group is None or world_size == 1:
        return [obj]
    data = msgpack.packb(obj, use_bin_type=True)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world_size)]
    dist.all_gather(bufs, padded, group=group)
    return [
        msgpack.unpackb(b[: int(s.item())].numpy().tobytes(), raw=False, strict_map_key=False)
        for b, s in zip(bufs, sizes, strict=True)
    ]


def all_reduce_min(value: int, group: dist.ProcessGroup | None) -> int:
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())
