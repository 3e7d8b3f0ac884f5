"""Frames between ranks (strata/distributed/channel.py): a length a peer announces past the cap is
refused before anything is allocated for it, and the sender refuses one too."""

from __future__ import annotations

import pytest


def test_a_frame_length_past_the_cap_is_refused_before_anything_is_allocated(monkeypatch):
    from strata.distributed import channel

    announced: list[int] = []

    def recv(tensor, src, group):  # a peer's word for the length; then the bytes, if asked for
        announced.append(tensor.numel())
        tensor.fill_(peer_says if tensor.numel() == 1 else 7)

    monkeypatch.setattr(channel.dist, "recv", recv)
    peer_says = 1 << 40  # a terabyte
    with pytest.raises(channel.FrameTooLarge, match=r"rank 3 announced a frame of 1099511627776 bytes"):
        channel.recv_bytes(3, group=None)
    assert announced == [1]  # nothing was allocated for it, nor received
    peer_says = -5
    with pytest.raises(channel.FrameTooLarge, match=r"outside \[0, "):
        channel.recv_bytes(0, group=None)
    peer_says = 10
    assert channel.recv_bytes(0, group=None) == bytes([7] * 10)
    with pytest.raises(channel.FrameTooLarge, match=r"10 bytes, outside \[0, 9\]"):
        channel.recv_bytes(0, group=None, limit=9)
    monkeypatch.setattr(channel, "MAX_FRAME_BYTES", 100)
    with pytest.raises(channel.FrameTooLarge, match="over the 100-byte limit"):  # refused where it is made
        channel.isend_bytes(b"x" * 101, 1, None, channel.PendingSends())


# Two real gloo ranks in child processes: rank 1 joins and then sends nothing (a stopped peer keeps
# its sockets open, as here). Gloo closes the pair on the timeout: the gang is rebuilt after it.
_RANK = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from strata.distributed import channel
rank, port = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                        timeout=timedelta(seconds=120))
if rank == 0:
    started = time.monotonic()
    try:
        channel.recv_bytes(1, None, timeout_s=1.5)
    except channel.RecvTimeout as err:
        print(f"timeout after {time.monotonic() - started:.1f} s: {err}", flush=True)
else:
    time.sleep(60)
os._exit(0)
"""


def test_a_receive_with_a_timeout_gives_up_on_a_silent_peer():
    """Without the timeout the receive would wait for the group's 120 s."""
    import subprocess
    import sys

    from tests.server_fixtures import free_port

    port = str(free_port())
    peer = subprocess.Popen([sys.executable, "-c", _RANK, "1", port])
    try:
        done = subprocess.run([sys.executable, "-c", _RANK, "0", port], capture_output=True, text=True, timeout=90)
    finally:
        peer.kill()
        peer.wait(30)
    lines = done.stdout.splitlines()
    assert done.returncode == 0 and len(lines) == 1, done.stdout + done.stderr
    seconds = float(lines[0].split()[2])
    assert 1.4 <= seconds < 10 and lines[0].endswith("rank 1 sent nothing for 1.5 s"), lines
