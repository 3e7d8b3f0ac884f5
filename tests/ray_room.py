"""A real two-node Ray for the room-wait tests (test_recovery_room.py, test_driver_room.py).

Each node is a `ray start --block` in a session of its own, with its own temp dir and token auth;
node 2 has its own address (NODE2_IP), so a pin to the head's address cannot take it. An engine
script runs in a child process (the test session's own Ray stays as it is): it starts with
CHILD_PRELUDE, streams, kills node 2 at a stream's 3rd token, and prints one JSON line per event:
{"ready": ...}, {"killed_at": n}, {"health": [state, reason, recoveries]} on each change,
{"done": ...}, then {"shut": ...}. `run_engine_script` reads them, starts node 2 again once the
engine says it waits for room, and returns what it saw.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.server_fixtures import free_port

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parent.parent
GIVE_UP_S = 40.0  # after the kill, how long the test waits for the reason before starting node 2 anyway
NODE2_IP = "127.0.0.2"  # its own address, so the driver's pin to the head's address cannot take it

# The engine scripts' common start. kill_tree(root): `root` and every process under it (raylet,
# workers: Ray starts those in sessions of their own), found through /proc.
CHILD_PRELUDE = """
import asyncio, json, os, signal, sys, time

def say(**kw):
    print(json.dumps(kw), flush=True)

def descendants(root):
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [p for p, pp in parents.items() if pp == pid]
    return found

def kill_tree(root):
    for pid in descendants(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
"""


class RayNodes:
    """The Ray processes of a test: each node a `ray start --block` in a session of its own.
    Ray starts its workers in sessions of their own too: the engine script kills a node as every
    process under its `ray start`; `stop_all` kills each node's group (workers exit without it)."""

    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "STRATA_HOST_IP")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0",
                        RAY_TMPDIR=root, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1",
                        # Ray marks a dead node after its health checks miss: 2 x 0.5 s here, not ~15 s.
                        RAY_health_check_period_ms="500", RAY_health_check_timeout_ms="500",
                        RAY_health_check_failure_threshold="2", RAY_health_check_initial_delay_ms="0")
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(Path(self.root) / f"{name}.log", "ab")  # noqa: SIM115 - the process keeps it
        proc = subprocess.Popen([RAY, "start", "--block", "--num-gpus", "0", "--disable-usage-stats", *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_head(self, num_cpus: int) -> subprocess.Popen:
        return self.start("head", "--head", "--port", str(self.port), "--num-cpus", str(num_cpus),
                          "--include-dashboard", "false", "--node-ip-address", "127.0.0.1",
                          "--temp-dir", f"{self.root}/head")

    def start_node2(self) -> subprocess.Popen:
        return self.start("node2", "--address", self.address, "--num-cpus", "1", "--node-ip-address", NODE2_IP,
                          "--temp-dir", f"{self.root}/node2")

    def wait_for_nodes(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True,
                                  text=True, timeout=60)
            if done.returncode == 0 and done.stdout.count(" node_") >= count:
                return
            time.sleep(1)
        raise AssertionError(f"the test's Ray has not {count} nodes:\n{self.logs()}")

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: this node's processes only
        except ProcessLookupError:
            pass
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.kill(proc)

    def logs(self) -> str:
        return "\n".join((p.read_text(errors="replace")[-2000:]) for p in Path(self.root).glob("*.log"))


@pytest.fixture
def ray_nodes():
    root = tempfile.mkdtemp(prefix="strata-room-")  # short: Ray's socket paths live under it
    nodes = RayNodes(root)
    try:
        yield nodes
    finally:
        nodes.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class EngineRun:
    """What the engine script printed, and when the test saw it (time.time())."""

    events: list[dict] = field(default_factory=list)
    waiting: dict | None = None  # the first health event `recovering` with "waiting for room"
    restarted: float | None = None  # when node 2 was started again
    ready: float | None = None  # when the engine said it serves
    log: str = ""  # the script's stderr: the engine's log

    def first(self, key: str) -> dict:
        return next(e for e in self.events if key in e)


def _next_line(lines: queue.Queue) -> str | None:
    """The engine script's next line; "" when none came within a second; None once it has ended."""
    try:
        return lines.get(timeout=1)
    except queue.Empty:
        return ""


def run_engine_script(nodes: RayNodes, script: str, model: str) -> EngineRun:
    """Starts node 2 (its `ray start` pid in a file, argv[2] of `script`, for the kill), runs
    `script` with argv[1] `model` on this Ray, starts node 2 again once the engine waits for room
    (or GIVE_UP_S after the kill without: a regression, so that the engine can end and the test
    fail), and returns what it printed once it said {"shut": ...} and exited 0."""
    node2_file = Path(nodes.root) / "node2.pid"
    node2_file.write_text(str(nodes.start_node2().pid))
    nodes.wait_for_nodes(2)
    env = {**nodes.env, "RAY_ADDRESS": nodes.address}
    log = Path(nodes.root) / "engine.log"
    with open(log, "w") as err:
        engine = subprocess.Popen([sys.executable, "-c", CHILD_PRELUDE + script, model, str(node2_file)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, iter(engine.stdout.readline, "")), lines.put(None)],
                     daemon=True).start()
    run, killed_t = EngineRun(), None
    try:
        while (line := _next_line(lines)) is not None:
            event = json.loads(line) if line.startswith("{") else {}
            run.events += [event] if event else []
            if "ready" in event:
                run.ready = time.time()
            killed_t = event.get("t") if "killed_at" in event else killed_t
            health = event.get("health")
            if health and run.waiting is None and health[0] == "recovering" and "waiting for room" in health[1]:
                run.waiting = event
                time.sleep(2)  # still waiting a moment later: nothing gives up
            gave_up = killed_t is not None and time.time() - killed_t > GIVE_UP_S
            if run.restarted is None and (run.waiting is not None or gave_up):
                run.restarted = time.time()
                node2_file.write_text(str(nodes.start_node2().pid))
            if "shut" in event:
                break
        engine.communicate(timeout=120)
    finally:
        if engine.poll() is None:
            engine.kill()
    run.log = log.read_text(errors="replace")
    assert engine.returncode == 0, run.log[-6000:] + nodes.logs()
    assert run.waiting is not None, run.events
    return run
