"""The typed byte channel the ranks talk over: point-to-point bytes and msgpack collectives.

Control traffic (step plans, results, start-up facts) travels as msgpack bytes over the gloo
control group (`RankGroups.control`, strata/distributed/process_groups.py), so no rank ever
unpickles what came over the network.
"""

from __future__ import annotations

import msgpack
import torch
import torch.distributed as dist


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
