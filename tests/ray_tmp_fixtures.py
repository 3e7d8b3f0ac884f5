"""A Ray temporary directory of a test's own, and a port nobody listens on: for the tests of which
Ray Strata joins (tests/test_startup_hardening.py, tests/test_startup_live.py)."""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def ray_tmp(monkeypatch):
    """A short RAY_TMPDIR of this test's own (Ray's socket paths must stay under ~107 bytes), no
    RAY_ADDRESS. Returns the path of the address file Ray would read there."""
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (Path(root) / "ray").mkdir()
    yield Path(root) / "ray" / "ray_current_cluster"
    shutil.rmtree(root, ignore_errors=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
