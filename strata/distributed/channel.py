"""The typed byte channel the ranks talk over: point-to-point bytes and msgpack collectives.

Control traffic (step plans, results, start-up facts) travels as msgpack bytes over the gloo
control group (`RankGroups.control`, strata/distributed/process_groups.py), so no rank ever
unpickles what came over the network. A frame is its length, then its bytes; a receiver never
allocates more than MAX_FRAME_BYTES on a peer's word (FrameTooLarge), so a corrupt or hostile
length fails that link with a clear error instead of exhausting the host's memory.
"""

from __future__ import annotations

from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist

# Far above any step plan or result (a plan announcing max_num_seqs prompts of max_model_len
# tokens at 4 bytes each is a few hundred MB at the very worst).
MAX_FRAME_BYTES = 1 << 30


class FrameTooLarge(RuntimeError):
    """A peer announced a frame no receiver should allocate: the link's framing is lost."""


class RecvTimeout(RuntimeError):
    """A peer sent nothing within the receiver's time limit (hung, or on a host that is)."""


def check_frame_size(size: int, src: int | str, limit: int = MAX_FRAME_BYTES) -> int:
    """`size` when a receiver may allocate it, else FrameTooLarge naming the peer."""
    if not 0 <= size <= limit:
        raise FrameTooLarge(f"rank {src} announced a frame of {size} bytes, outside [0, {limit}]: the peer is "
                            f"corrupt or not a Strata rank; refusing to allocate it (the link is unusable now)")
    return size


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
    if len(data) > MAX_FRAME_BYTES:  # the receiver would refuse it: say so here, where it is made
        raise FrameTooLarge(f"a frame of {len(data)} bytes for rank {dst} is over the {MAX_FRAME_BYTES}-byte limit")
    size = torch.tensor([len(data)], dtype=torch.int64)
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    pending.add(dist.isend(size, dst=dst, group=group), size)
    pending.add(dist.isend(payload, dst=dst, group=group), payload)


def recv_bytes(src: int, group: dist.ProcessGroup, limit: int = MAX_FRAME_BYTES,
               timeout_s: float | None = None) -> bytes:
    """One frame from `src`; FrameTooLarge when its announced length is over `limit`. With
    `timeout_s`, RecvTimeout when a part of it has not come within that many seconds: a stopped
    process keeps its sockets open, so a plain receive from it waits for the group's own timeout."""
    size = torch.empty(1, dtype=torch.int64)
    _recv(size, src, group, timeout_s)
    buf = torch.empty(check_frame_size(int(size.item()), src, limit), dtype=torch.uint8)
    _recv(buf, src, group, timeout_s)
    return buf.numpy().tobytes()


def _recv(tensor: torch.Tensor, src: int, group: dist.ProcessGroup, timeout_s: float | None) -> None:
    if timeout_s is None:
        dist.recv(tensor, src=src, group=group)
        return
    try:
        dist.irecv(tensor, src=src, group=group).wait(timedelta(seconds=timeout_s))
    except RuntimeError as err:
        if "Timed out" not in str(err):  # a peer that died: its own error, as a plain receive gives
            raise
        raise RecvTimeout(f"rank {src} sent nothing for {timeout_s:g} s") from err


def all_gather_msgpack(obj, group: dist.ProcessGroup | None, world_size: int) -> list:
    """Every rank's `obj` (msgpack-able), in rank order."""
    if group is None or world_size == 1:
        return [obj]
    data = msgpack.packb(obj, use_bin_type=True)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
    longest = max(check_frame_size(int(s.item()), rank) for rank, s in enumerate(sizes))
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
