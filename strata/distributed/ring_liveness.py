"""How the ring's peers watch each other: processes by pid and start time, and how a wait polls.

Liveness. Peers are watched by pid and start time (from /proc, so a zombie or a recycled pid
counts as dead); the writer and its readers must therefore share a PID namespace (one container,
or containers sharing the host's), which a reader checks when it attaches. No wait is forever:
every wait checks the other side about every `check_s` seconds. The writer raises PeerDied naming
the reader whose process is gone, that reported `fail()`, or that never attached within
`attach_timeout`; readers raise PeerDied when the writer's process is gone without closing, and,
once they have read everything published, RingClosed after `close()` or RingAborted after
`abort()`. `timeout=` on `write`/`read` raises RingTimeout. Otherwise a wait lasts as long as the
other side is alive (a slow rank is not a dead one; the writer logs a warning every
`stall_warn_s` while held back).

Waiting polls: a short spin (sched_yield), then sleeps doubling up to `max_sleep_s`, then, once
idle for `idle_after_s` (a reader: since its last message, across `read` calls), `idle_sleep_s`.
An idle engine costs little CPU; a busy one sees its plan within tens to hundreds of microseconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Poll:
    """How a wait polls (see the module docstring)."""

    spin_s: float = 200e-6
    first_sleep_s: float = 10e-6
    max_sleep_s: float = 100e-6
    idle_after_s: float = 1.0
    idle_sleep_s: float = 5e-3
    check_s: float = 0.1  # how often a wait checks that the other side is alive


class Backoff:
    """One wait's polling. `idle_from`: since when nothing has happened (a reader's last message,
    which may be before this wait began), what the idle phase counts from."""

    __slots__ = ("poll", "start", "idle_from", "sleep", "next_check")

    def __init__(self, poll: Poll, idle_from: float | None = None):
        self.poll = poll
        self.start = time.monotonic()
        self.idle_from = self.start if idle_from is None else idle_from
        self.sleep = poll.first_sleep_s
        self.next_check = self.start + poll.check_s

    def pause(self) -> float:
        """Waits a little; returns the time now."""
        now = time.monotonic()
        if now - self.start < self.poll.spin_s:
            os.sched_yield()
        elif now - self.idle_from < self.poll.idle_after_s:
            time.sleep(self.sleep)
            self.sleep = min(self.sleep * 2, self.poll.max_sleep_s)
        else:
            time.sleep(self.poll.idle_sleep_s)
        return time.monotonic()

    def due(self, now: float) -> bool:
        """True about every `check_s`: time to check the peers."""
        if now < self.next_check:
            return False
        self.next_check = now + self.poll.check_s
        return True


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None when it is gone or a zombie.
    Where /proc is missing, 0 for any live pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0
    fields = stat.rsplit(b")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])  # field 22 of proc(5)


def alive(pid: int, start: int) -> bool:
    """Whether process `pid`, started at `start` (clock ticks since boot), still runs: a zombie or a
    recycled pid does not."""
    return pid > 0 and _start_time(pid) == start


def own_start_time() -> int:
    """This process's start time, as peers will check it (0 where /proc cannot tell)."""
    start = _start_time(os.getpid())
    return 0 if start is None else start
