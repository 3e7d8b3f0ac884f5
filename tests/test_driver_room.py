"""A new driver waits for room, saying why, when the driver died with its node.

A real two-node Ray on this machine (tests/test_recovery_room.py's RayNodes): a head with no CPU,
like a KubeRay head without GPUs, and a second node with 1 CPU, the only place the one stage
(and so the driver) fits. The engine is started as the Serve ingress starts it: a named,
detached driver, supervised (app/engine_supervisor.py). A greedy stream runs through a tiny
llama; at its third token the second node is killed, the driver with it. The engine turns
`recovering`, its health reason what the new driver waits for ("waiting for room: stage 0 needs a
node with 1 CPU free ..."), and no new driver is tried meanwhile. A second node started again
ends the wait: a new driver starts there and the stream ends with the text of an undisturbed run.
Then node 2 is killed once more and not started again: the shutdown ends that wait at once.

The engine runs in a child process (_ENGINE_SCRIPT): the test session's own Ray stays as it is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Queue

import pytest

from tests.test_recovery_room import NODE2_IP, REPO, RayNodes, _next_line

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

GIVE_UP_S = 40.0  # after the kill, how long the test waits for the reason before starting node 2 anyway

# Prints one JSON line per event: {"ready": ...}, {"killed_at": n}, {"health": ...} on each change,
# {"done": ...}, then {"shut": s}. Argv: model dir, a file holding the second node's `ray start`
# pid: it and every process under it die at a stream's 3rd token.
_ENGINE_SCRIPT = """
import asyncio, json, os, signal, sys, time
from strata.app.engines import driver_actor_name, start_engine
from strata.app.model_source import preflight
from strata.config import EngineConfig
from strata.engine_protocol import EngineRequest
from strata.sampling_params import SamplingParams

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
config = EngineConfig(model=model, distributed_executor_backend="ray", max_model_len=256, placement_timeout_s=20)
engine = start_engine(config, preflight(config), driver_name=driver_actor_name("test", "driver-room"))
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
prompt = [(7 * i + 3) % 500 + 3 for i in range(12)]

def kill_node2():
    for pid in descendants(int(open(node2_file).read())):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

async def stream(tag, kill_at=None):
    tokens = []
    async for delta in engine.generate(EngineRequest(tag, prompt, params)):
        tokens += delta.token_ids
        if kill_at is not None and len(tokens) >= kill_at:
            kill_node2()
            say(killed_at=len(tokens), t=time.time())
            kill_at = None
    return tokens

async def main():
    import ray
    reference = await stream("reference")
    driver = ray.get(engine.ray_engine.actor.rank_pids.remote())[0]
    say(ready=True, driver_on_node2=driver in descendants(int(open(node2_file).read())))
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
                await asyncio.to_thread(engine.shutdown)
                try:
                    await asyncio.wait_for(task, 30)
                    ended = "completed"
                except Exception as err:
                    ended = type(err).__name__ + ": " + str(err)[:200]
                say(shut=time.monotonic() - started, stream=ended, restarts=engine.restarts)
                return
            await asyncio.sleep(0.2)
        h = await engine.health()
        say(done=task.result(), reference=reference, health=[h.state, h.reason, h.recoveries],
            restarts=engine.restarts, t=time.time())

asyncio.run(main())
"""


@pytest.fixture
def ray_nodes():
    root = tempfile.mkdtemp(prefix="strata-droom-")  # short: Ray's socket paths live under it
    nodes = RayNodes(root)
    try:
        yield nodes
    finally:
        nodes.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def test_a_driver_lost_with_its_node_is_started_again_once_there_is_room(ray_nodes, tiny_models):
    nodes = ray_nodes
    began = time.time()
    nodes.start("head", "--head", "--port", str(nodes.port), "--num-cpus", "0", "--include-dashboard", "false",
                "--node-ip-address", "127.0.0.1", "--temp-dir", f"{nodes.root}/head")
    node2_file = Path(nodes.root) / "node2.pid"
    node2_file.write_text(str(nodes.start_node2().pid))
    nodes.wait_for_nodes(2)
    env = {**nodes.env, "RAY_ADDRESS": nodes.address}
    log = Path(nodes.root) / "engine.log"
    with open(log, "w") as err:
        engine = subprocess.Popen([sys.executable, "-c", _ENGINE_SCRIPT, tiny_models("llama"), str(node2_file)],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: Queue = Queue()
    threading.Thread(target=lambda: [*map(lines.put, iter(engine.stdout.readline, "")), lines.put(None)],
                     daemon=True).start()
    events, waiting, restarted, killed_t, ready = [], None, None, None, None
    try:
        while (line := _next_line(lines)) is not None:
            event = json.loads(line) if line.startswith("{") else {}
            events += [event] if event else []
            if "ready" in event:
                ready = time.time()
                assert event["driver_on_node2"], event
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
    assert waiting is not None, events
    done, shut = next(e for e in events if "done" in e), events[-1]
    killed = next(e for e in events if "killed_at" in e)
    print(f"cluster up and engine serving in {ready - began:.1f} s; node 2 killed at token {killed['killed_at']}; "
          f"'waiting for room' on /health after {waiting['t'] - killed['t']:.1f} s; stream done "
          f"{done['t'] - restarted:.1f} s after node 2 was started again; reason: {waiting['health'][1]}")
    reason = waiting["health"][1]
    assert "stage 0 needs a node with 1 CPU free (bundle 0, {'CPU': 1} each, STRICT_PACK" in reason, reason
    assert f"it was on {NODE2_IP}, which left the cluster" in reason and "(head): 0 CPU" in reason, reason
    # While it waited: `recovering` throughout, and no failed start of a new driver.
    assert all(e["health"][0] != "failed" and "failed" not in (e["health"][1] or "")
               for e in events if "health" in e), events
    assert done["health"][0] == "serving" and done["restarts"] == 1, done
    assert done["done"] == done["reference"] and len(done["done"]) == 64
    print(f"shut down {shut['shut']:.2f} s after the second 'waiting for room'; the open stream: {shut['stream']}")
    assert shut["shut"] < 20 and "the engine was shut down" in shut["stream"] and shut["restarts"] == 1, shut
