"""The shared-memory ring's segment: created with its pages reserved (by the writer), mapped by
name (by a reader), removed when a dead writer left it behind.

Segments. The writer creates the segment (reserving its pages up front, so a full /dev/shm is
an error here rather than a SIGBUS later) and unlinks it in `close()`/`abort()`; readers that
already attached keep their mapping and drain. Readers never unlink and never register with
multiprocessing's resource_tracker (they map the segment themselves), so a reader's exit neither
destroys the writer's segment nor warns of a leak. Should the writer's process die, its
resource_tracker unlinks the segment when that process tree ends; `unlink_segment(name)` does it
at once.
"""

from __future__ import annotations

import mmap
import os
from multiprocessing import shared_memory

from strata.distributed.ring_errors import RingError
from strata.distributed.ring_layout import (
    MAGIC,
    VERSION,
    W_MAGIC,
    W_READER_TABLE,
    W_READERS,
    W_SLOT_BYTES,
    W_SLOTS,
    W_VERSION,
    Geometry,
)

try:  # what multiprocessing.shared_memory itself opens segments with (POSIX)
    import _posixshmem
except ImportError:  # pragma: no cover - not POSIX
    _posixshmem = None


def create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    """A new segment `name` of `size` bytes (mode 0600), its pages reserved; RingError when
    /dev/shm cannot hold it. Registered with this process's resource_tracker, as SharedMemory does."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=size)
    try:
        _reserve(shm, size)
    except BaseException:
        shm.close()
        shm.unlink()
        raise
    return shm


def _reserve(shm: shared_memory.SharedMemory, size: int) -> None:
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        free = ""
        try:
            st = os.statvfs("/dev/shm")
            free = f" ({st.f_bavail * st.f_frsize / 2**20:.0f} MiB free in /dev/shm)"
        except OSError:
            pass
        raise RingError(f"cannot reserve {size / 2**20:.1f} MiB of shared memory for the ring: "
                        f"{err.strerror}{free}; give the container a larger /dev/shm or lower "
                        f"slots / slot_bytes") from None


def map_segment(name: str) -> tuple[mmap.mmap, memoryview, memoryview, Geometry] | None:
    """Maps ring `name` as a reader does (by itself, not through SharedMemory: no resource_tracker):
    (mmap, its bytes, its meta words, geometry); None while it does not exist or is not yet
    initialised."""
    if _posixshmem is None:  # pragma: no cover - not POSIX
        raise RingError("shared-memory rings need POSIX shared memory")
    try:
        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < mmap.PAGESIZE:
            return None  # created, not sized yet
        mm = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    buf = memoryview(mm)
    head = buf[:W_READER_TABLE * 8].cast("Q")
    if head[W_MAGIC] != MAGIC:
        head.release()
        buf.release()
        mm.close()
        return None  # not initialised yet
    g = Geometry(head[W_SLOTS], head[W_SLOT_BYTES], head[W_READERS])
    version = head[W_VERSION]
    head.release()
    if version != VERSION or g.size != size:
        buf.release()
        mm.close()
        raise RingError(f"ring {name}: version {version}, {size} bytes: not a ring this code reads")
    return mm, buf, buf[:g.meta_bytes].cast("Q"), g


def unlink_segment(name: str) -> bool:
    """Removes a ring's segment left behind by a writer that died; True when there was one.
    Goes through SharedMemory so this process's resource_tracker stays consistent."""
    try:
        seg = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    seg.close()
    seg.unlink()
    return True
