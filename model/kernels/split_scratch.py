"""Scratch for kernels whose programs meet in the last one to finish (split-K partials).

`skinny_matmul`'s split-K and `moe_route`'s fused router each keep one: float32 partials and int32
arrival counters per device, at addresses a CUDA graph can replay.
"""

from __future__ import annotations

import torch


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
