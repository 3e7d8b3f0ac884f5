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
