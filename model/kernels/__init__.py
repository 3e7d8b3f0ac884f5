"""Triton kernels for the GPU hot path (attention, cache writes, small fused ops).

Each kernel module offers a launcher that runs on CUDA tensors and, for tests, under Triton's
interpreter (`TRITON_INTERPRET=1`) on CPU tensors; the layers in `strata.model.layers` keep a
plain-torch path beside each kernel, which is the reference the kernel is tested against.
`triton_available()` says whether Triton can be imported at all (CPU-only installs may lack it).
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
