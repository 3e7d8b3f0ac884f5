"""A rebuild waits for room, saying why, when a stage's node has left the Ray cluster.

A real two-node Ray on this machine, started here (its own temp dir, token auth): a head with 1
CPU, where the driver and stage 0 go, and a second node with 1 CPU, the only place stage 1 fits.
A greedy stream runs through a tiny llama at pp 2; at its third token the second node is killed
(every process of its group: raylet, its workers, rank 1). The engine turns `recovering` and its
health reason says what it waits for ("waiting for room: stage 1 needs a node with 1 CPU free
..."); no failed recovery is counted meanwhile. A second node started again ends the wait: the
gang is rebuilt and the stream ends with the text of an undisturbed run. Then node 2 is killed once
more under a second stream and not started again: the shutdown ends that wait at once. (One test,
one cluster: a Ray of two nodes and the engine take ~40 s to start on two cores.)

The engine runs in a child process (_ENGINE_SCRIPT): the test session's own Ray stays as it is.
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
from pathlib import Path

import pytest

from tests.server_fixtures import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RAY = str(Path(sys.executable).with_name("ray"))
REPO = Path(__file__).resolve().parent.parent
GIVE_UP_S = 40.0  # after the kill, how long the test waits for the reason before starting node 2 anyway
NODE2_IP = "127.0.0.2"  # its own address, so the driver's pin to the head's address cannot take it

# Prints one JSON line per event: {"ready": pids}, {"killed_at": n}, {"health": ...} on each
# change, {"done": ...}, then {"shut": s}. Argv: model dir, a file holding the second node's
# `ray start` pid: it and every process under it (raylet, workers: Ray starts those in sessions of
# their own) die at a stream's 3rd token. The second stream's wait for room ends in the shutdown.
_ENGINE_SCRIPT = """
import asyncio, json, os, signal, sys, time
from strata import LLM, SamplingParams
from strata.engine_protocol import EngineRequest

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

model, node2_file = sys.argv[1], sys.argv[2]
llm = LLM(model, pipeline_parallel_size=2, distributed_executor_backend="ray", max_model_len=256,
          placement_timeout_s=20)
engine = llm._engine
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
prompt = [(7 * i + 3) % 500 + 3 for i in range(12)]

async def stream(tag, kill_at=None):
    tokens = []
    async for delta in engine.generate(EngineRequest(tag, prompt, params)):
        tokens += delta.token_ids
        if kill_at is not None and len(tokens) >= kill_at:
            for pid in descendants(int(open(node2_file).read())):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            say(killed_at=len(tokens), t=time.time())
            kill_at = None
    return tokens

async def main():
    import ray
    reference = await stream("reference")
    pids = ray.get(engine.actor.rank_pids.remote())
    say(ready=pids, on_node2=[r for r, pid in pids.items() if pid in descendants(int(open(node2_file).read()))])
    for tag in ("disturbed", "shut down"):
        task = asyncio.ensure_future(stream(tag, kill_at=3))
        last = None
        while not task.done():
            h = await engine.health()
            now = [h.state, h.reason, h.recoveries]
            if now != last:
                say(health=now, t=time.time())
                last = now
            if tag == "shut down" and "waiting for room" in (h.reason or ""):
                started = time.monotonic()
                await asyncio.to_thread(llm.shutdown)
                shut_s = time.monotonic() - started
                try:
                    await asyncio.wait_for(task, 30)
                    ended = "completed"
                except Exception as err:
                    ended = type(err).__name__ + ": " + str(err)[:200]
                say(shut=shut_s, stream=ended)
                return
            await asyncio.sleep(0.2)
        h = await engine.health()
        say(done=task.result(), reference=reference, health=[h.state, h.reason, h.recoveries], t=time.time())

asyncio.run(main())
"""


class RayNodes:
    """The Ray processes of this test: each node a `ray start --block` in a session of its own.
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

    def start_head(self) -> subprocess.Popen:
        return self.start("head", "--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard",
                          "false", "--node-ip-address", "127.0.0.1", "--temp-dir", f"{self.root}/head")

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


def _next_line(lines: queue.Queue) -> str | None:
    """The engine script's next line; "" when none came within a second; None once it has ended."""
    try:
        return lines.get(timeout=1)
    except queue.Empty:
        return ""


@pytest.fixture
def ray_nodes():
    root = tempfile.mkdtemp(prefix="strata-room-")  # short: Ray's socket paths live under it
    nodes = RayNodes(root)
    try:
        yield nodes
    finally:
        nodes.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_a_lost_node_is_waited_for_with_the_reason_then_the_stream_completes(ray_nodes, tiny_models):
    """The wait, its reason and the resumed stream; then a second wait ended by the shutdown in
    seconds, its open stream ending with an error rather than hanging."""
    nodes = ray_nodes
    began = time.time()
    nodes.start_head()
    node2_file = Path(nodes.root) / "node2.pid"
    node2_file.write_text(str(nodes.start_node2().pid))
    nodes.wait_for_nodes(2)
    env = {**nodes.env, "RAY_ADDRESS": nodes.address}
    log = Path(nodes.root) / "engine.log"
    with open(log, "w") as err:
        engine = subprocess.Popen([sys.executable, "-c", _ENGINE_SCRIPT, tiny_models("llama"), str(node2_file)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, iter(engine.stdout.readline, "")), lines.put(None)],
                     daemon=True).start()
    events, waiting, restarted, killed_t, ready = [], None, None, None, None
    try:
        while (line := _next_line(lines)) is not None:
            event = json.loads(line) if line.startswith("{") else {}
            events += [event] if event else []
            if "ready" in event:
                ready = time.time()
                assert event["on_node2"] == ["1"] or event["on_node2"] == [1], event  # stage 1: node 2 alone
            killed_t = event.get("t") if "killed_at" in event else killed_t
            health = event.get("health")
            if health and waiting is None and health[0] == "recovering" and "waiting for room" in health[1]:
                waiting = event
                time.sleep(2)  # still waiting a moment later: nothing gives up
            gave_up = killed_t is not None and time.time() - killed_t > GIVE_UP_S
            if restarted is None and (waiting is not None or gave_up):
                restarted = time.time()  # without a wait (a regression): so the engine can end, and the test fail
                node2_file.write_text(str(nodes.start_node2().pid))
            if "shut" in event:
                break
        engine.communicate(timeout=120)
    finally:
        if engine.poll() is None:
            engine.kill()
    served = log.read_text(errors="replace")
    assert engine.returncode == 0, served[-6000:] + nodes.logs()
    done, shut = next(e for e in events if "done" in e), events[-1]
    killed = next(e for e in events if "killed_at" in e)
    assert waiting is not None, events
    for line in served.splitlines():
        if "rebuild:" in line or "recovered in" in line:
            print(line)
    print(f"cluster up and engine serving in {ready - began:.1f} s; node 2 killed at token {killed['killed_at']}; "
          f"'waiting for room' on /health after {waiting['t'] - killed['t']:.1f} s; stream done "
          f"{done['t'] - restarted:.1f} s after node 2 was started again; reason: {waiting['health'][1]}")
    assert "rebuild: waiting for room: stage 1 needs" in served, served[-6000:]
    reason = waiting["health"][1]
    assert "stage 1 needs a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK" in reason, reason
    assert f"it was on {NODE2_IP}, which left the cluster" in reason and "(head): 0 CPU" in reason, reason
    # Every health seen while it waited was `recovering`, none `failed`; one recovery in all.
    assert all(e["health"][0] != "failed" and "rebuilding the gang" not in (e["health"][1] or "")
               for e in events if "health" in e), events
    assert done["health"][0] == "serving" and done["health"][2] == 1, done
    assert done["done"] == done["reference"] and len(done["done"]) == 64
    print(f"shut down {shut['shut']:.2f} s after the second 'waiting for room'; the open stream: {shut['stream']}")
    assert shut["shut"] < 20 and "the engine was shut down" in shut["stream"], shut
