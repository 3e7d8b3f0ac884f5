"""A dead Serve replica costs no engine: `strata serve` (ray backend) on a tiny model at tp 2, a
stream in flight, the ingress replica's process SIGKILLed. Serve starts a new replica, which
attaches to the driver actor still running (named, detached: RayEngine._attach) instead of
loading a second engine: the driver's pid is unchanged, a new request is served, the dead
replica's request is aborted in the engine, and Ctrl-C afterwards still stops the (detached)
driver and frees its placement groups."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import httpx
import pytest

from strata.app.engines import DRIVER_NAMESPACE, driver_actor_name
from tests.server_fixtures import free_port, server_env, spawn, stop_process, wait_healthy

pytestmark = pytest.mark.slow

PROMPT = [11, 12, 13, 14, 15]  # token ids: the tiny model's vocabulary is not the tokenizer's
SERVED = "smol-attach"
DRIVER = driver_actor_name("strata", SERVED)


def _alive(class_part: str) -> dict[str, dict]:
    from ray._private.state import actors

    return {a: info for a, info in actors(actor_state_name="ALIVE").items() if class_part in info["ActorClassName"]}


def _complete(url: str, max_tokens: int, **kwargs) -> httpx.Response:
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=kwargs.get("timeout", 120))


@pytest.mark.timeout(400)
def test_a_new_replica_attaches_to_the_running_driver(tiny_models, tmp_path, ray_cluster):
    import ray
    from ray.util import placement_group_table

    model = tiny_models("qwen2", max_position_embeddings=4096)
    groups_before = {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", model, "--distributed-executor-backend", "ray",
           "-tp", "2", "--port", str(port), "--max-model-len", "4096", "--served-model-name", SERVED,
           "--uvicorn-log-level", "warning", "--drain-timeout", "5"]
    proc = spawn(cmd, {**server_env(ray_cluster.get_runtime_context().gcs_address), "OMP_NUM_THREADS": "1"}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        expected = _complete(url, 8).json()["choices"][0]["text"]
        driver = ray.get_actor(DRIVER, namespace=DRIVER_NAMESPACE)
        [driver_info] = [a for a in _alive("Driver").values() if a["Name"] == DRIVER]
        assert driver_info["IsDetached"], driver_info
        [(replica_id, replica)] = _alive("StrataIngress").items()

        lost = threading.Thread(target=lambda: _complete(url, 4000, timeout=30), daemon=True)
        lost.start()  # in flight when its replica dies
        deadline = time.monotonic() + 30
        while ray.get(driver.stats.remote())["num_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(replica["Pid"], signal.SIGKILL)
        killed = time.monotonic()
        while True:  # a new replica, serving
            assert time.monotonic() - killed < 180, log.read_text()[-4000:]
            try:
                new = replica_id not in _alive("StrataIngress")
                if new and httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        back_s = time.monotonic() - killed
        r = _complete(url, 8)
        served_s = time.monotonic() - killed
        print(f"replica SIGKILLed: /health 200 from a new replica after {back_s:.1f} s, a request served by "
              f"{served_s:.1f} s")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected, r.text
        [after] = [a for a in _alive("Driver").values() if a["Name"] == DRIVER]
        assert after["Pid"] == driver_info["Pid"]  # the same driver: no second engine
        assert len(_alive("RankWorker")) == 1  # tp 2: rank 1 only, the same gang
        deadline = time.monotonic() + 30
        while (running := ray.get(driver.stats.remote())["num_running"]) != 0:  # the orphan was aborted
            assert time.monotonic() < deadline, running
            time.sleep(0.2)
        stop_process(proc)
        assert proc.returncode == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # detached: stopped by the shutdown, not by Ray reaping a job's actors
        left = [a["Name"] for a in _alive("Driver").values() if a["Name"] == DRIVER]
        groups = {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"} - groups_before
        if not (left or groups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left and not groups, (left, groups)
