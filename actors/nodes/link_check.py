"""Measuring the link between two nodes: a short all-reduce, its bandwidth, and the transport.

`strata doctor` runs one per node pair, in rounds of disjoint pairs (`pair_rounds`) so every
node takes part in at most one measurement at a time. On GPU the all-reduce goes through NCCL
with NCCL_DEBUG=INFO written to a file, and the file says which network NCCL chose: "IB" (or
RoCE through the IB verbs) is what multi-node serving wants; "Socket" means NCCL fell back to
TCP, typically ten times slower. On CPU it is gloo over TCP.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from pydantic import BaseModel

from strata.actors.nodes.node_address import set_socket_ifname_for
from strata.distributed.process_groups import rendezvous_store
from strata.distributed.sockets import bind_listener

_NETWORK = re.compile(r"Using network (\S+)")
_VIA_NET = re.compile(r"via NET/([A-Za-z]+)")


class LinkResult(BaseModel):
    transport: str  # "NCCL NET/IB", "NCCL NET/Socket", "gloo TCP", or "?" when NCCL's log said nothing
    nbytes: int
    seconds: float  # per all-reduce, mean over the timed iterations
    bandwidth_gbps: float  # bus bandwidth, GB/s (for 2 ranks equal to bytes / time)


def pair_rounds(n: int) -> list[list[tuple[int, int]]]:
    """Every pair of n nodes exactly once, in n - 1 (n even) or n rounds of disjoint pairs
    (the circle method), so the measurements of one round can run at once."""
    slots = list(range(n)) + ([None] if n % 2 else [])
    rounds = []
    for _ in range(len(slots) - 1):
        half = len(slots) // 2
        pairs = [(slots[i], slots[-1 - i]) for i in range(half)]
        rounds.append([tuple(sorted(p)) for p in pairs if None not in p])
        slots = [slots[0], slots[-1], *slots[1:-1]]  # keep the first, rotate the rest
    return [r for r in rounds if r]


def nccl_transport(log_text: str) -> str:
    """The network NCCL chose, from its NCCL_DEBUG=INFO lines ("NET/IB", "NET/Socket", ...)."""
    m = _NETWORK.search(log_text) or _VIA_NET.search(log_text)
    return f"NCCL NET/{m.group(1)}" if m else "?"


def timed_all_reduce(group: dist.ProcessGroup | None, device: torch.device, nbytes: int, iters: int) -> float:
    """Seconds per all-reduce of `nbytes`, after one warm-up (which also opens the connections)."""
    x = torch.ones(max(nbytes // 4, 1), dtype=torch.float32, device=device)
    dist.all_reduce(x, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x, group=group)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / iters


def result_of(transport: str, nbytes: int, seconds: float) -> LinkResult:
    return LinkResult(transport=transport, nbytes=nbytes, seconds=seconds,
                      bandwidth_gbps=nbytes / seconds / 1e9 if seconds > 0 else 0.0)


class PairEndpoint:
    """One node's end of pair measurements, in a process of its own (a Ray actor): each
    measurement is a fresh two-rank world, torn down afterwards."""

    def __init__(self, ip: str):
        self.ip = ip
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self._listener = None
        self._nccl_log = None
        set_socket_ifname_for(ip)
        if self.device.type == "cuda":
            # Read once per process by NCCL: every measurement of this process appends here.
            self._nccl_log = os.path.join(tempfile.mkdtemp(prefix="strata-doctor-"), "nccl.log")
            os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=self._nccl_log)

    def open_port(self) -> int:
        """As the pair's first rank: listen for the store on this node's address."""
        self._listener = bind_listener(self.ip)
        return self._listener.getsockname()[1]

    def measure(self, master_addr: str, port: int, rank: int, nbytes: int, iters: int, timeout_s: float) -> dict:
        offset = os.path.getsize(self._nccl_log) if self._nccl_log and os.path.exists(self._nccl_log) else 0
        store = rendezvous_store(rank, 2, master_addr, port, timeout_s, self._listener if rank == 0 else None)
        self._listener = None
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=rank, world_size=2, timeout=timedelta(seconds=timeout_s),
                                device_id=self.device if backend == "nccl" else None)
        try:
            seconds = timed_all_reduce(None, self.device, nbytes, iters)
        finally:
            dist.destroy_process_group()
        transport = "gloo TCP"
        if self._nccl_log:
            with open(self._nccl_log, errors="replace") as f:
                f.seek(offset)
                transport = nccl_transport(f.read())
        return result_of(transport, nbytes, seconds).model_dump()
