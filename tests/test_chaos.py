"""A bounded chaos run (issue 15): `strata serve -tp 3` on the bundled model over mp, under
continuous load, while a random non-driver rank is SIGKILLed every 20-40 s for about three
minutes. Zero requests lost or altered: every request completes, with no error, and its text is
that of an undisturbed run; the engine counts one recovery per kill, serves at the end, and holds
no KV block.

The load: CLIENTS streaming clients, each issuing requests back to back from a fixed pool
(greedy and seeded sampling, several lengths) whose texts were streamed once, undisturbed, by the
same server before the first kill. The chaos: a thread with its own seeded generator (the ranks
and the delays it draws are logged) that kills only while the engine serves and the load has
moved since the last recovery, so that every kill lands on requests in flight.

tp 3 because the bundled model's 9 heads do not split in 2; mp because a rebuild there starts two
processes (no Ray, no placement groups); OMP_NUM_THREADS=1 because three ranks of two threads
each on two cores run ~10x slower."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.server_fixtures import API_KEY, LiveServer, free_port, server_env, spawn, stop_process, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

TP = 3
SEED = 4  # the chaos thread's generator: which rank, and when
CHAOS_S = 180.0  # the load runs this long (from its start); kills only in the first CHAOS_S - QUIET_S
QUIET_S = 25.0  # no kill this close to the end, so that the last recovery ends inside the run
KILL_EVERY_S = (20.0, 40.0)
CLIENTS = 6
SERVED = "smol-chaos"
PROMPTS = ["The capital of France is", "Once upon a time, a small robot", "def fibonacci(n):",
           "The three primary colors are", "A recipe for bread:", "In the year 2050,",
           "My favourite animal is", "Write a haiku about rain."]
# The pool: (prompt, max_tokens, sampling); even entries greedy, odd ones seeded.
POOL = [(p, 16 + 8 * (i % 3), {"temperature": 0.0} if i % 2 == 0 else
         {"temperature": 0.9, "top_p": 0.95, "seed": 1500 + i}) for i, p in enumerate(PROMPTS)]


def _body(i: int) -> dict:
    prompt, max_tokens, sampling = POOL[i]
    return {"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            **sampling}


@dataclass
class Outcome:
    """One request of the load: which pool entry, by which client, when, and what came back."""

    pool: int
    client: int
    started: float
    ended: float = 0.0
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Load:
    """What the clients share with the chaos thread (read without a lock: ints and appends)."""

    t0: float
    chunks: int = 0  # chunks received by every stream so far
    open_streams: dict[int, int] = field(default_factory=dict)  # client -> chunks of its stream now
    outcomes: list[Outcome] = field(default_factory=list)


async def _stream(client: httpx.AsyncClient, out: Outcome, load: Load | None) -> None:
    """Streams pool entry out.pool into `out`; any failure is recorded in out.error, not raised."""
    parts: list[str] = []
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=_body(out.pool)) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:500]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = f"error event: {chunk}"
                    return
                choice = chunk["choices"][0]
                parts.append(choice["text"])
                if choice.get("finish_reason") is not None:
                    out.finish_reason = choice["finish_reason"]
                if load is not None:
                    load.chunks += 1
                    load.open_streams[out.client] = load.open_streams.get(out.client, 0) + 1
        if not done:
            out.error = "the stream ended without [DONE]"
        elif out.finish_reason != "length":
            out.error = f"finish_reason {out.finish_reason!r}, not 'length' (ignore_eos, max_tokens)"
    except Exception as err:  # noqa: BLE001 - recorded: the test reports every lost request
        out.error = f"{type(err).__name__}: {err}"
    finally:
        out.text, out.ended = "".join(parts), time.monotonic()
        if load is not None:
            load.open_streams.pop(out.client, None)


def _client(url: str) -> httpx.AsyncClient:
    # A stream waits through a rebuild (tens of seconds on two loaded cores): a generous read timeout.
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=httpx.Timeout(300, connect=30))


async def _references(url: str) -> list[str]:
    """Every pool entry streamed once, all at once, undisturbed."""
    outs = [Outcome(i, i, time.monotonic()) for i in range(len(POOL))]
    async with _client(url) as client:
        await asyncio.gather(*(_stream(client, o, None) for o in outs))
    assert [o.error for o in outs] == [None] * len(POOL), [o.error for o in outs]
    return [o.text for o in outs]


async def _run_load(url: str, load: Load) -> None:
    """CLIENTS clients, each streaming pool entries back to back until CHAOS_S has passed."""
    picks = itertools.count()

    async def one_client(c: int) -> None:
        async with _client(url) as client:
            while time.monotonic() - load.t0 < CHAOS_S:
                out = Outcome(next(picks) % len(POOL), c, time.monotonic())
                load.outcomes.append(out)
                await _stream(client, out, load)
                if out.error is not None:
                    await asyncio.sleep(1.0)  # a failed engine answers at once: no flood

    await asyncio.gather(*(one_client(c) for c in range(CLIENTS)))


@dataclass
class Kill:
    at: float  # seconds since the load started
    rank: int
    pid: int
    open_streams: int  # streams with tokens out when the kill landed
    recovered_s: float | None = None  # the kill to /health 200 with the recovery counted
    resumed: int | None = None  # requests the engine resumed (its log)
    rebuild_s: float | None = None  # the engine's own "recovered in" (its log)


class Chaos:
    """The killer thread: SIGKILLs a random non-driver rank every KILL_EVERY_S (drawn from a
    generator seeded with SEED) while the engine serves, and times each recovery."""

    def __init__(self, server: LiveServer, load: Load):
        self.server, self.load = server, load
        self.rng = random.Random(SEED)
        self.kills: list[Kill] = []
        self.health: list[tuple[float, int, dict]] = []  # (time, status, body) polled meanwhile
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "the chaos thread did not end"
        if self.error is not None:
            raise self.error

    def _now(self) -> float:
        return time.monotonic() - self.load.t0

    def _run(self) -> None:
        try:
            self._kill_loop()
        except BaseException as err:  # noqa: BLE001 - re-raised on the test's thread
            self.error = err

    def _kill_loop(self) -> None:
        next_at = self.rng.uniform(*KILL_EVERY_S)
        chunks_at_recovery = 0
        while not self._stop.is_set():
            if next_at >= CHAOS_S - QUIET_S:
                print(f"chaos: next kill would be at {next_at:.1f} s, inside the last {QUIET_S:g} s: done")
                return
            if self._stop.wait(max(0.0, next_at - self._now())):
                return
            # Under load: the engine has served since the last recovery, and streams are open.
            deadline = time.monotonic() + 60
            while self.load.chunks < chunks_at_recovery + 2 * CLIENTS or not self.load.open_streams:
                assert time.monotonic() < deadline, "no load to kill under"
                time.sleep(0.05)
            rank = self.rng.randint(1, TP - 1)
            pid = self._rank_pid(rank)
            open_streams = sum(1 for n in list(self.load.open_streams.values()) if n > 0)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            kill = Kill(self._now(), rank, pid, open_streams)
            self.kills.append(kill)
            print(f"chaos: kill {len(self.kills)} at {kill.at:.1f} s: SIGKILL rank {rank} (pid {pid}), "
                  f"{open_streams} stream(s) mid-way", flush=True)
            self._wait_recovered(kill, killed)
            chunks_at_recovery = self.load.chunks
            next_at = kill.at + self.rng.uniform(*KILL_EVERY_S)

    def _rank_pid(self, rank: int) -> int:
        """The pid of `rank` in the gang serving now, as the engine logged it (at start, or after
        the last rebuild), checked to be a live child of the server (never some other process
        that reused a dead rank's pid)."""
        text = self.server.log.read_text(errors="replace")
        found = re.findall(rf"rank {rank} \(tp \d+, pp \d+, pid (\d+)\)|rank {rank} pid (\d+)", text)
        assert found, text[-3000:]
        pid = int(next(p for p in found[-1] if p))
        assert pid not in {k.pid for k in self.kills}, f"rank {rank}'s pid {pid} was killed already"
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        assert int(fields[1]) == self.server.proc.pid and fields[0] not in ("Z", "X"), (pid, fields[:2])
        return pid

    def _wait_recovered(self, kill: Kill, killed: float) -> None:
        """Polls /health until it is 200 with this kill's recovery counted."""
        deadline = killed + 180
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                r = httpx.get(self.server.url + "/health", timeout=5)
                body = r.json()
                self.health.append((self._now(), r.status_code, body))
                if r.status_code == 200 and body["recoveries"] >= len(self.kills):
                    kill.recovered_s = t - killed
                    print(f"chaos: kill {len(self.kills)}: serving again after {kill.recovered_s:.1f} s "
                          f"(recoveries {body['recoveries']})", flush=True)
                    return
                assert body["state"] != "failed", body
            except httpx.HTTPError as err:
                self.health.append((self._now(), 0, {"error": str(err)}))
            time.sleep(0.2)
        raise AssertionError(f"kill {len(self.kills)} (rank {kill.rank}, pid {kill.pid}): no recovery within "
                             f"180 s; last /health: {self.health[-3:]}\n{self.server.log.read_text()[-6000:]}")


def _engine_log(kills: list[Kill], log_text: str) -> None:
    """Fills each kill's resumed count and rebuild time from the engine's log, in order."""
    resumed = [int(n) for n in re.findall(r"recovering; (\d+) request\(s\) in flight will resume", log_text)]
    rebuilt = [float(s) for s in re.findall(r"recovered in ([\d.]+) s: a new gang is serving", log_text)]
    for kill, n, s in zip(kills, resumed, rebuilt, strict=False):
        kill.resumed, kill.rebuild_s = n, s


def _kv_blocks(server: LiveServer) -> tuple[float, float, float]:
    """(free blocks, total blocks, requests running) from /metrics."""
    m = server.metrics()
    return m["strata:kv_cache_free_blocks{}"], m["strata:kv_cache_total_blocks{}"], m["strata:num_requests_running{}"]


def test_random_rank_kills_under_load_lose_and_alter_no_request(tmp_path):
    started = time.monotonic()
    port, log = free_port(), tmp_path / "server.log"
    cmd = [sys.executable, "-m", "strata.app.cli", "serve", "--distributed-executor-backend", "mp", "-tp", str(TP),
           "--port", str(port), "--max-model-len", "512", "--api-key", API_KEY, "--served-model-name", SERVED,
           "--uvicorn-log-level", "warning", "--drain-timeout", "5",
           # ~6 kills in three minutes: past the default budget (3 within 600 s), which would fail stop.
           "--max-recoveries", "50", "--recovery-window", "600"]
    proc = spawn(cmd, {**server_env(None), "OMP_NUM_THREADS": "1"}, log)
    server = LiveServer("mp", f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_healthy(server.url, proc, log, timeout_s=300)
        free_start, total, _ = _kv_blocks(server)
        assert free_start == total, (free_start, total)
        references = asyncio.run(_references(server.url))
        print(f"server up and {len(POOL)} references streamed in {time.monotonic() - started:.1f} s")

        load = Load(time.monotonic())
        chaos = Chaos(server, load)
        chaos.start()
        try:
            asyncio.run(_run_load(server.url, load))
        finally:
            chaos.join()
        load_s = time.monotonic() - load.t0
        log_text = log.read_text(errors="replace")
        _engine_log(chaos.kills, log_text)

        outcomes = load.outcomes
        print(f"chaos seed {SEED}: {len(chaos.kills)} kill(s) in {load_s:.1f} s of load; "
              f"{len(outcomes)} requests by {CLIENTS} clients")
        for n, k in enumerate(chaos.kills, 1):
            spanned = sum(1 for o in outcomes if o.started < load.t0 + k.at < o.ended)
            print(f"  kill {n} at {k.at:6.1f} s: rank {k.rank} pid {k.pid}; {spanned} request(s) spanned it "
                  f"({k.open_streams} mid-stream, engine resumed {k.resumed}); serving again after "
                  f"{k.recovered_s:.1f} s (engine's rebuild {k.rebuild_s} s)")
        lost = [o for o in outcomes if o.error is not None]
        altered = [o for o in outcomes if o.error is None and o.text != references[o.pool]]

        def where(o: Outcome) -> str:
            spans = [n for n, k in enumerate(chaos.kills, 1) if o.started < load.t0 + k.at < o.ended]
            return (f"pool {o.pool} (client {o.client}, {o.started - load.t0:.1f}-{o.ended - load.t0:.1f} s, "
                    f"across kill(s) {spans})")

        assert not lost, "lost: " + "; ".join(f"{where(o)}: {o.error}" for o in lost) + "\n" + log_text[-6000:]
        assert not altered, "altered: " + "; ".join(
            f"{where(o)}: {o.text!r} != {references[o.pool]!r}" for o in altered)
        # Seed 4 plans 5 kills (ranks 1, 2, 1, 2, 1); recoveries slower than planned gaps (a loaded
        # machine) push the later ones back, past the window.
        assert len(chaos.kills) >= 3, chaos.kills
        assert all(k.resumed is not None and k.resumed > 0 for k in chaos.kills), chaos.kills  # kills under load
        assert len(outcomes) >= 3 * CLIENTS

        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["state"] == "serving" and body["recoveries"] == len(chaos.kills), body
        assert not any(status not in (200, 503) for _, status, _ in chaos.health), chaos.health  # it answered
        deadline = time.monotonic() + 30
        while (blocks := _kv_blocks(server)) != (free_start, total, 0):
            assert time.monotonic() < deadline, f"KV blocks leaked: {blocks}, {free_start} free at the start"
            time.sleep(0.5)
        times = [k.recovered_s for k in chaos.kills]
        print(f"recovery (kill to /health 200): min {min(times):.1f} s, max {max(times):.1f} s, "
              f"mean {sum(times) / len(times):.1f} s; all {free_start:.0f} KV blocks free at the end")

        stop_process(proc)
        assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
        print(f"test wall time {time.monotonic() - started:.1f} s")
    finally:
        if proc.poll() is None:
            stop_process(proc)
