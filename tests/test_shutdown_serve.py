"""`strata serve` shut down with streams in flight, as real processes, on both backends: SIGTERM
to its whole process group (a terminal's Ctrl-C, systemd's default) drains for --drain-timeout,
not more: meanwhile /health and new requests get 503 with Retry-After; the streams that can
finish within the limit finish, the rest get 503; the log has no traceback; it exits 0, leaving
no process, actor or placement group. And the private local Ray `strata serve` starts is out of
reach of that signal: the same shutdown, end to end, on one (and no async actor of it blocks on
ray.get, by Ray's own warning). The drain's own cases, in-process: tests/test_shutdown_drain.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server_fixtures import free_port, server_env, spawn, wait_healthy

pytestmark = pytest.mark.slow

# A tiny random model: the short streams finish within the drain even at a few steps a second
# (two busy cores), the long ones not even at 400 (tens are usual here).
DRAIN_S = 8.0
SHORT_TOKENS, LONG_TOKENS = 8, 4000
MAX_MODEL_LEN = 4096
PROMPT = [11, 12, 13, 14, 15]  # token ids: the tiny model's vocabulary is not the tokenizer's
CLEAN_LOG = ("Traceback", "CancelledError", "Event loop is closed", "Exception in thread")


async def _stream(client: httpx.AsyncClient, max_tokens: int, first: asyncio.Event) -> list[dict]:
    """The stream's events (parsed), [DONE] left out; each with "_at", when it came (monotonic)."""
    body = {"model": "smol", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    events = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                first.set()
                data = line.removeprefix("data: ")
                if data != "[DONE]":
                    events.append({**json.loads(data), "_at": time.monotonic()})
    return events


async def _shutdown_with_traffic(url: str, proc: subprocess.Popen) -> tuple[list, list, httpx.Response, dict]:
    """8 streams (half short, half long) and one long plain request in flight, then SIGTERM to the
    server's process group; returns (short streams, long streams, the plain one, what the drain
    answered meanwhile)."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def timed_plain() -> tuple[httpx.Response, float]:
            response = await client.post("/v1/completions", json={
                "model": "smol", "prompt": PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True})
            return response, time.monotonic()

        plain = asyncio.ensure_future(timed_plain())
        firsts = [asyncio.Event() for _ in range(8)]
        streams = [asyncio.ensure_future(_stream(client, SHORT_TOKENS if i % 2 else LONG_TOKENS, firsts[i]))
                   for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 120)
        os.killpg(proc.pid, signal.SIGTERM)
        seen: dict = {"signalled": time.monotonic()}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the handler may take a moment to run
            health = await client.get("/health")
            if health.status_code == 503:
                seen["health"] = health
                seen["new"] = await client.post("/v1/completions", json={"model": "smol", "prompt": PROMPT})
                break
            await asyncio.sleep(0.1)
        results = await asyncio.gather(*streams)
        response, seen["plain_at"] = await plain
        return results[1::2], results[0::2], response, seen


# How long after the signal the drain may cut what is still in flight, beyond --drain-timeout:
# the signal handler and, on Ray, the drain's call through Serve's handle to the replica, then the
# 503 event's way back to the client. Measured here 0.01-0.15 s; seconds of margin for two busy
# shared cores. (Item 10's bug: the drain lasted --drain-timeout + 30 s.)
DRAIN_LATE_S = 3.0
# After the drain, how long the server may take to exit: mp, uvicorn's close and the engine's stop
# (measured 1.2-1.7 s); Ray, the engine's stop through the replica, Serve's delete and shutdown,
# and ray.shutdown() (measured 4.7 s on a joined cluster, 5-10 s with a private Ray to stop, whose
# ray.shutdown() alone took up to 6.7 s on the loaded machine). Margin as above.
STOP_S = {"mp": 6.0, "ray": 16.0}


def _check_shutdown(proc: subprocess.Popen, log, short, long, plain, seen, backend: str) -> None:
    for name in ("health", "new"):
        r = seen.get(name)
        assert r is not None, f"no 503 from /health during the drain:\n{log.read_text()[-3000:]}"
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 0, (name, r.status_code, r.headers)
        assert r.json()["error"]["code"] == 503
    for events in short:
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
    for events in long:
        assert events[-1]["error"]["code"] == 503, events[-1]
    assert plain.status_code == 503 and plain.json()["error"]["type"] == "ServiceUnavailableError"
    assert proc.wait(60) == 0, log.read_text()[-4000:]
    took = seen.get("exited", time.monotonic()) - seen["signalled"]
    # The drain lasts --drain-timeout: the requests still running are cut when it is up, not before
    # and not seconds later. The 503s are timed as the client reads them, so never early, except
    # that Serve's replica runs uvloop, which sets a timer from its loop's cached time: seen 0.06 s
    # early, half a second allowed.
    cut = [events[-1]["_at"] - seen["signalled"] for events in long] + [seen["plain_at"] - seen["signalled"]]
    print(f"drain ({backend}): cut {min(cut):.2f}-{max(cut):.2f} s after the signal, exit after {took:.2f} s")
    assert DRAIN_S - 0.5 <= min(cut) and max(cut) <= DRAIN_S + DRAIN_LATE_S, (
        f"cut {min(cut):.2f}-{max(cut):.2f} s after the signal (drain limit {DRAIN_S} s)")
    assert max(cut) <= took <= DRAIN_S + STOP_S[backend], (
        f"signal to exit took {took:.1f} s (drain limit {DRAIN_S} s)")
    text = log.read_text()
    assert not [bad for bad in CLEAN_LOG if bad in text], text[-6000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nothing of its process group is left


@pytest.fixture(scope="module")
def tiny_model(tiny_models) -> str:
    return tiny_models("qwen2", max_position_embeddings=MAX_MODEL_LEN)


def _serve(model: str, backend: str, tmp_path, ray_address: str | None,
           env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen, object]:
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", model, "--distributed-executor-backend", backend,
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "smol",
           "--drain-timeout", str(DRAIN_S), "--uvicorn-log-level", "warning"]
    # One torch thread, as Ray gives its workers: on two shared cores, more make the mp server's
    # steps erratic (seconds each), and the short streams would not finish within the drain.
    proc = spawn(cmd, {**server_env(ray_address), "OMP_NUM_THREADS": "1", **(env or {})}, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        deadline = time.monotonic() + 60
        while "Strata is serving" not in log.read_text():  # serving and listening for the signal
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return url, proc, log


def _run(model: str, backend: str, tmp_path, ray_address: str | None) -> None:
    url, proc, log = _serve(model, backend, tmp_path, ray_address)
    try:
        _check_shutdown(proc, log, *asyncio.run(_shutdown_with_traffic(url, proc)), backend=backend)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_to_the_group_drains_then_exits_clean_mp(tiny_model, tmp_path):
    _run(tiny_model, "mp", tmp_path, None)


def test_sigterm_to_the_group_drains_then_exits_clean_ray(tiny_model, tmp_path, ray_cluster):
    from ray._private.state import actors
    from ray.util import placement_group_table

    before_actors = set(actors(actor_state_name="ALIVE"))
    before_groups = {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}
    _run(tiny_model, "ray", tmp_path, ray_cluster.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 30
    while True:  # Ray reaps a dead job's actors and groups asynchronously
        left_actors = {a: info["ActorClassName"] for a, info in actors(actor_state_name="ALIVE").items()
                       if a not in before_actors}
        left_groups = {pg for pg, info in placement_group_table().items()
                       if info["state"] != "REMOVED" and pg not in before_groups}
        if not (left_actors or left_groups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left_actors and not left_groups, (left_actors, left_groups)


# Ray's warning, once per process, when an async actor calls ray.get (ray/_private/worker.py):
# the call blocks the actor's event loop (issue 17 item 4). Ray mutes it in the processes that
# import ray.serve (its controller, proxy and replicas: ray/serve/__init__.py), so in the logs it
# can come from the engine's own async actor, the driver, only.
BLOCKING_GET_WARNING = "Using blocking ray.get inside async actor"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _ray_processes_under(root: str) -> list[psutil.Process]:
    """Live processes whose command line names `root` (a Ray's GCS, raylet and agents name
    their session directory, under its RAY_TMPDIR)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if _alive(proc) and any(root in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def private_ray_run(tiny_model, tmp_path_factory) -> dict:
    """`strata serve` on the Ray backend with no cluster to join (no RAY_ADDRESS, nothing recorded
    under its RAY_TMPDIR), so on a private Ray of its own, shut down by SIGTERM to its whole
    process group with streams in flight; what the two tests below check: what the drain
    answered, the processes it had started (by pid) still alive afterwards, and every log of
    that Ray (the server's, Serve's, each worker's)."""
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    (Path(root) / "ray").mkdir()
    started: list[psutil.Process] = []
    try:
        url, proc, log = _serve(tiny_model, "ray", tmp_path_factory.mktemp("private-ray"), None,
                                {"RAY_TMPDIR": root})
        try:
            at_start = log.read_text()
            started = [p for p in psutil.Process(proc.pid).children(recursive=True) if _alive(p)]
            shielded = [p.name() for p in started if os.getpgid(p.pid) != proc.pid]  # in sessions of their own
            traffic = asyncio.run(_shutdown_with_traffic(url, proc))
            rc = proc.wait(60)
            traffic[-1]["exited"] = time.monotonic()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10  # ray.shutdown() stopped them; a moment for the last to be reaped
        while [p for p in started if _alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [(p.pid, p.name()) for p in started if _alive(p)] + [(p.pid, p.name())
                                                                    for p in _ray_processes_under(root)]
        logs = [f for f in (Path(root) / "ray").glob("session_2*/logs/**/*")
                if f.is_file() and f.suffix in (".log", ".out", ".err")]
        texts = {str(f.relative_to(root)): f.read_text(errors="replace") for f in logs}
        texts["server.log"] = log.read_text()
        return dict(proc=proc, rc=rc, log=log, at_start=at_start, shielded=shielded, traffic=traffic, left=left,
                    texts=texts)
    finally:
        for p in [p for p in started if _alive(p)] + _ray_processes_under(root):  # only if something failed
            with contextlib.suppress(psutil.Error):
                p.kill()
        shutil.rmtree(root, ignore_errors=True)


def test_sigterm_to_the_group_drains_then_exits_clean_on_its_own_private_ray(private_ray_run):
    """SIGTERM to the group of a `strata serve` on its own private Ray (item 10 end to end): the
    private Ray is out of the signal's reach (its GCS and raylet in sessions of their own), so it
    drains as on a joined cluster: the short streams finish, the rest get 503 JSON, no traceback,
    exit 0; then nothing is left, of its group or of the private Ray."""
    run = private_ray_run
    assert "starting a private local Ray" in run["at_start"], run["at_start"][-3000:]
    assert "joining the Ray cluster" not in run["at_start"], run["at_start"][-3000:]
    assert {"gcs_server", "raylet"} <= set(run["shielded"]), run["shielded"]
    assert run["rc"] == 0, run["log"].read_text()[-4000:]
    _check_shutdown(run["proc"], run["log"], *run["traffic"], backend="ray")
    assert not run["left"], run["left"]
    # What test_no_blocking_ray_get_in_an_async_actor reads: the driver actor's log (Ray names a
    # worker's actor in it) and Serve's are there.
    texts = run["texts"]
    assert [name for name, text in texts.items() if ":actor_name:Driver" in text], sorted(texts)
    assert [name for name in texts if "/serve/" in name], sorted(texts)


def test_no_blocking_ray_get_in_an_async_actor(private_ray_run):
    """Item 4: nothing blocks an async actor's event loop: Ray's warning about a blocking ray.get
    inside an async actor is in no log of the Ray `strata serve` ran on, over its whole life
    (start, serving, drain, stop). Ray warns once per process, and not at all in Serve's
    processes (BLOCKING_GET_WARNING), so this watches the driver actor, whose log is read too."""
    texts = private_ray_run["texts"]  # the driver actor's and Serve's logs among them: checked above
    warned = {name: next(line for line in text.splitlines() if BLOCKING_GET_WARNING in line)
              for name, text in texts.items() if BLOCKING_GET_WARNING in text}
    assert not warned, warned


_SHIELD = textwrap.dedent("""
    import os, signal, threading, types
    import psutil, ray
    from strata.app.ray_cluster import ensure_ray

    ensure_ray(types.SimpleNamespace(ray_address="local", world_size=1))
    ours = os.getpgid(0)
    spawned = psutil.Process().children(recursive=True)
    print("SHARED", [p.name() for p in spawned if os.getpgid(p.pid) == ours], flush=True)
    got = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: got.set())
    print("READY", flush=True)
    assert got.wait(60)
    print("ALIVE", ray.get(ray.remote(lambda: 7).remote(), timeout=60) == 7, flush=True)
    ray.shutdown()
    print("LEFT", [p.pid for p in spawned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], flush=True)
""")


def test_the_private_ray_is_out_of_reach_of_a_signal_to_the_group(tmp_path):
    """SIGTERM to the process group of a process that started a private Ray leaves the Ray
    running (its processes are in sessions of their own), and ray.shutdown() still stops them."""
    log = tmp_path / "shield.log"
    proc = spawn([sys.executable, "-c", _SHIELD], server_env(None), log)
    try:
        deadline = time.monotonic() + 90
        while "READY" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in log.read_text().splitlines()
             if line.split(" ", 1)[0] in ("SHARED", "ALIVE", "LEFT")}
    assert lines == {"SHARED": "[]", "ALIVE": "True", "LEFT": "[]"}, log.read_text()[-3000:]
