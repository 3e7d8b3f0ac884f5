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

import time

import pytest

from tests.ray_room import NODE2_IP, run_engine_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Prints one JSON line per event (tests/ray_room.py): {"ready": pids, "on_node2": ranks}, {"killed_at": n},
# {"health": ...} on each change, {"done": ...}, then {"shut": s}. Argv: model dir, a file holding
# the second node's `ray start` pid: its processes die at a stream's 3rd token. The second stream's
# wait for room ends in the shutdown.
_ENGINE_SCRIPT = """
from strata import LLM, SamplingParams
from strata.engine_protocol import EngineRequest

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
            kill_tree(int(open(node2_file).read()))
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


def test_a_lost_node_is_waited_for_with_the_reason_then_the_stream_completes(ray_nodes, tiny_models):
    """The wait, its reason and the resumed stream; then a second wait ended by the shutdown in
    seconds, its open stream ending with an error rather than hanging."""
    nodes = ray_nodes
    began = time.time()
    nodes.start_head(num_cpus=1)
    run = run_engine_script(nodes, _ENGINE_SCRIPT, tiny_models("llama"))
    served, waiting, events = run.log, run.waiting, run.events
    ready, killed = run.first("ready"), run.first("killed_at")
    assert ready["on_node2"] == ["1"] or ready["on_node2"] == [1], ready  # stage 1: node 2 alone
    done, shut = run.first("done"), events[-1]
    for line in served.splitlines():
        if "rebuild:" in line or "recovered in" in line:
            print(line)
    print(f"cluster up and engine serving in {run.ready - began:.1f} s; node 2 killed at token {killed['killed_at']}; "
          f"'waiting for room' on /health after {waiting['t'] - killed['t']:.1f} s; stream done "
          f"{done['t'] - run.restarted:.1f} s after node 2 was started again; reason: {waiting['health'][1]}")
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
