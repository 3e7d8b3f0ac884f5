"""Kernels whose programs meet in the last one to finish: their scratch and the arrival count.

`skinny_matmul`'s split-K and `moe_route`'s fused router each keep a `SplitScratch`: float32
partials and int32 arrival counters per device, at addresses a CUDA graph can replay.
`last_to_arrive` is the count itself, shared by those two, split-KV attention and `moe_pairs`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def last_to_arrive(counter_ptr, arrivals):
    """Whether this program is the last of `arrivals` to reach `counter_ptr`; that one re-arms the
    counter to zero for the next launch (a CUDA graph replays it). The barrier puts every thread's
    stores before the count, and the count is acq_rel at GPU scope, so the last program sees every
    other program's partials (read them from L2, `.cg`, past this SM's L1)."""
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed")
    return last


class SplitScratch:
    """Split-K's float32 partials and int32 arrival counters for one device, grown (never while a
    CUDA graph is captured: the runner's eager warm-up before capture grows them) and reused, so
    a graph replays the same addresses. A buffer outgrown is kept, not freed: graphs captured
    before still write to it. Every launch leaves the counters at zero."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self.retired: list[torch.Tensor] = []

    def get(self, device: torch.device, partial_elems: int, counters: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The two buffers, at least this large; None while capturing if they would have to grow."""
        wants = ((torch.float32, partial_elems), (torch.int32, counters))
        if any(self._short(dtype, device, numel) for dtype, numel in wants):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            for dtype, numel in wants:
                if self._short(dtype, device, numel):
                    old = self.buffers.get((dtype, device))
                    if old is not None:
                        self.retired.append(old)
                        numel = max(numel, 2 * old.numel())  # geometric: few retired buffers
                    self.buffers[dtype, device] = torch.zeros(numel, dtype=dtype, device=device)
        return self.buffers[torch.float32, device], self.buffers[torch.int32, device]

    def _short(self, dtype: torch.dtype, device: torch.device, numel: int) -> bool:
        buf = self.buffers.get((dtype, device))
        return buf is None or buf.numel() < numel
