"""A new driver waits for room, saying why, when the driver died with its node.

A real two-node Ray on this machine (tests/ray_room.py): a head with no CPU,
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

import time

import pytest

from tests.ray_room import NODE2_IP, run_engine_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Prints one JSON line per event (tests/ray_room.py): {"ready": ..., "driver_on_node2": bool},
# {"killed_at": n}, {"health": ...} on each change, {"done": ...}, then {"shut": s}. Argv: model
# dir, a file holding the second node's `ray start` pid: its processes die at a stream's 3rd token.
_ENGINE_SCRIPT = """
from strata.app.engines import driver_actor_name, start_engine
from strata.app.model_source import preflight
from strata.config import EngineConfig
from strata.engine_protocol import EngineRequest
from strata.sampling_params import SamplingParams

model, node2_file = sys.argv[1], sys.argv[2]
config = EngineConfig(model=model, distributed_executor_backend="ray", max_model_len=256, placement_timeout_s=20)
engine = start_engine(config, preflight(config), driver_name=driver_actor_name("test", "driver-room"))
params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
prompt = [(7 * i + 3) % 500 + 3 for i in range(12)]

async def stream(tag, kill_at=None):
    tokens = []
    async for delta in engine.generate(EngineRequest(tag, prompt, params)):
        tokens += delta.token_ids
        if kill_at is not None and len(tokens) >= kill_at:
            kill_tree(int(open(node2_file).read()))
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


def test_a_driver_lost_with_its_node_is_started_again_once_there_is_room(ray_nodes, tiny_models):
    nodes = ray_nodes
    began = time.time()
    nodes.start_head(num_cpus=0)
    run = run_engine_script(nodes, _ENGINE_SCRIPT, tiny_models("llama"))
    waiting, events = run.waiting, run.events
    assert run.first("ready")["driver_on_node2"], run.first("ready")
    done, shut = run.first("done"), events[-1]
    killed = run.first("killed_at")
    print(f"cluster up and engine serving in {run.ready - began:.1f} s; node 2 killed at token {killed['killed_at']}; "
          f"'waiting for room' on /health after {waiting['t'] - killed['t']:.1f} s; stream done "
          f"{done['t'] - run.restarted:.1f} s after node 2 was started again; reason: {waiting['health'][1]}")
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
