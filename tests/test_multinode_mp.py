"""The mp backend across two real hosts (network namespaces, tests/netns_cluster.py), no Ray:
node 0 on host 1 serves the API, node 1 on host 2 runs headless. tp=2 x pp=2 answers as Hugging
Face does with a stage on each host; the headless node exits once the head stops, or is killed;
a node pointed at a wrong master, and a head whose other node never comes, fail in time naming
what is missing; `strata doctor` with the same node flags checks both hosts and their link. A
rank of the headless node killed, then the whole headless node killed and started again, then the
whole headless node stopped (hung) and continued (it rejoins by itself), cost no request: the
head rebuilds the gang (waiting, /health naming the node, until it rejoins)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.netns_cluster import hf_reference_texts, netns_unavailable, query_completions, stop, two_hosts

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (5, 40)]
MAX_TOKENS = 12
PORT = 8000
MASTER_PORT = 29555


@pytest.fixture(scope="module")
def hosts():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with two_hosts() as cluster:
        yield cluster


def _serve(model: str, *node_flags: str) -> list[str]:
    return [sys.executable, "-m", "strata.app.cli", "serve", model, "-tp", "2", "-pp", "2", "--max-model-len", "256",
            "--nnodes", "2", "--master-port", str(MASTER_PORT), *node_flags]


def test_serve_tp2_pp2_on_two_nodes_matches_hf_and_headless_exits_after_head(hosts, tiny_models, tmp_path):
    model = tiny_models("llama")
    head_log, node_log = tmp_path / "head.log", tmp_path / "node1.log"
    head = hosts.spawn(hosts.head, _serve(model, "--node-rank", "0", "--master-addr", hosts.head.ip, "--port",
                                          str(PORT), "--dist-init-timeout", "90"), head_log, NCCL_DEBUG="INFO")
    node = hosts.spawn(hosts.worker, _serve(model, "--node-rank", "1", "--master-addr", hosts.head.ip, "--headless",
                                            "--dist-init-timeout", "90"), node_log, NCCL_DEBUG="INFO")
    try:
        got = query_completions(hosts, hosts.head, PORT, PROMPTS, MAX_TOKENS, head, head_log)
        assert node.poll() is None, node_log.read_text()[-4000:]
        listeners = {h.ip: _listeners(hosts, h) for h in hosts.hosts}
    finally:
        head_rc = stop(head)
        try:
            node_rc = node.wait(40)  # no signal: it must notice the head is gone by itself
        except subprocess.TimeoutExpired:
            node.kill()
            node_rc = None
    text, node_text = head_log.read_text(), node_log.read_text()
    assert [t for t, _ in got] == hf_reference_texts(model, PROMPTS, MAX_TOKENS)
    assert all(n == MAX_TOKENS for _, n in got)
    assert re.search(r"stage 0 -> \S+ \(10\.77\.0\.1\) -> \[rank 0: cpu, rank 1: cpu\]", text), text[-4000:]
    assert re.search(r"stage 1 -> \S+ \(10\.77\.0\.2\) -> \[rank 2: cpu, rank 3: cpu\]", text), text[-4000:]
    # Node 1's own environment reaches its ranks, and gloo uses the interface holding its address.
    assert re.search(r"\[rank 3\] rank 3 on 10\.77\.0\.2 via stv\w+; .*NCCL_DEBUG=INFO", node_text), node_text[-4000:]
    # No Ray here: every listener in a host is ours, and each binds to that host's address (the
    # rendezvous, the store, gloo) or to --host (the API, loopback by default), never to all interfaces.
    assert listeners["10.77.0.1"] and listeners["10.77.0.2"], listeners
    for ip, addresses in listeners.items():
        assert addresses <= {ip, "127.0.0.1"}, listeners
    assert head_rc == 0, text[-4000:]
    assert node_rc == 0 and re.search(r"the head (at \S+ )?shut down", node_text), node_text[-4000:]


def test_a_headless_node_exits_when_the_head_is_killed(hosts, tiny_models, tmp_path):
    """No Bye: the node tries to rejoin for its --dist-init-timeout, then exits 1 saying why."""
    model = tiny_models("llama")
    head_log, node_log = tmp_path / "head.log", tmp_path / "node1.log"
    head = hosts.spawn(hosts.head, _serve(model, "--node-rank", "0", "--master-addr", hosts.head.ip, "--port",
                                          str(PORT), "--dist-init-timeout", "60"), head_log)
    node = hosts.spawn(hosts.worker, _serve(model, "--node-rank", "1", "--master-addr", hosts.head.ip, "--headless",
                                            "--dist-init-timeout", "20"), node_log)
    try:
        deadline = time.monotonic() + 90
        while "ranks 2-3 started" not in node_log.read_text() and time.monotonic() < deadline:
            assert node.poll() is None, node_log.read_text()[-3000:]
            time.sleep(0.2)
        head.kill()  # no shutdown plan, no Bye: the connection just ends
        killed_at = time.monotonic()
        node_rc = node.wait(20 + 30)
        print(f"node 1 exited {time.monotonic() - killed_at:.1f} s after the head was killed")
    finally:
        for proc in (head, node):
            if proc.poll() is None:
                proc.kill()
        hosts.head.kill_all()  # the killed head's own rank process, orphaned
    text = node_log.read_text()
    assert node_rc == 1, text[-3000:]
    assert "strata serve: error: node 1: the head at 10.77.0.1:" in text, text[-3000:]
    assert "went away" in text or "rank process(es) died" in text, text[-3000:]
    assert "node 1: lost the head" in text and "rejoining for up to 20 s" in text, text[-3000:]
    assert f"could not reach the head (node 0) at 10.77.0.1:{MASTER_PORT}" in text, text[-3000:]


def _listeners(hosts, host) -> set[str]:
    """The local addresses of every listening TCP socket in `host` (`ss`, from iproute2)."""
    out = hosts.run(host, ["ss", "-ltnH"], timeout_s=30).stdout
    return {line.split()[3].rsplit(":", 1)[0].strip("[]") for line in out.splitlines() if line.strip()}


def test_nodes_that_never_meet_fail_within_their_timeouts(hosts, tiny_models, tmp_path):
    """Both at once, on their own hosts: a node pointed at an address where no head is, and a
    head whose node 1 never comes."""
    model = tiny_models("llama")
    lost_log, alone_log = tmp_path / "lost.log", tmp_path / "alone.log"
    started = time.monotonic()
    lost = hosts.spawn(hosts.worker, _serve(model, "--node-rank", "1", "--master-addr", "10.77.0.9", "--headless",
                                            "--dist-init-timeout", "5"), lost_log)
    alone = hosts.spawn(hosts.head, _serve(model, "--node-rank", "0", "--master-addr", hosts.head.ip,
                                           "--dist-init-timeout", "5", "--port", str(PORT)), alone_log)
    for proc in (lost, alone):
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()
    elapsed = time.monotonic() - started
    lost_text, alone_text = lost_log.read_text(), alone_log.read_text()
    assert lost.returncode == 1, lost_text[-3000:]
    assert f"could not reach the head (node 0) at 10.77.0.9:{MASTER_PORT} within 5 s" in lost_text, lost_text[-3000:]
    assert alone.returncode == 1, alone_text[-3000:]
    assert "node rank(s) 1 did not join within 5 s" in alone_text, alone_text[-3000:]
    assert "joined: 0 (10.77.0.1)" in alone_text
    assert elapsed < 5 + 45, elapsed  # the timeout, plus starting Python and checking the model on busy cores


def test_doctor_with_mp_node_flags_checks_both_hosts(hosts, tmp_path):
    def doctor(rank: int) -> list[str]:
        return [sys.executable, "-m", "strata.app.cli", "doctor", "--nnodes", "2", "--node-rank", str(rank),
                "--master-addr", hosts.head.ip, "--master-port", str(MASTER_PORT + 1), "--timeout", "30"]

    logs = [tmp_path / "doctor0.log", tmp_path / "doctor1.log"]
    procs = [hosts.spawn(h, doctor(i), log) for i, (h, log) in enumerate(zip(hosts.hosts, logs, strict=True))]
    for proc in procs:
        proc.wait(120)
    out = logs[0].read_text()
    assert [p.returncode for p in procs] == [0, 0], out + logs[1].read_text()
    for ip in ("10.77.0.1", "10.77.0.2"):
        assert re.search(rf"^{re.escape(ip)} .* ok$", out, re.M), out
    assert re.search(r"10\.77\.0\.1 <-> 10\.77\.0\.2\s+gloo TCP .* ok", out), out


# ---- faults across nodes: a rank of the headless node killed, then the whole node ----

# Run inside host 1: greedy streams, one per prompt (token ids in), and /health polled meanwhile.
# Prints "progress" once every stream has a few chunks, "health {...}" whenever /health's answer
# changes, and "texts [...]" at the end.
_STREAMS = """
import json, sys, threading, time
import httpx
url, prompts, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
progress, texts, done = [0] * len(prompts), [None] * len(prompts), threading.Event()
def say(*parts):
    print(*parts, flush=True)
def stream(i):
    body = {"model": MODEL, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    out = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.append("<error: %s>" % chunk["error"])
                    break
                out.append(chunk["choices"][0]["text"])
                progress[i] += 1
    texts[i] = "".join(out)
def health():
    last = None
    while not done.is_set():
        try:
            r = httpx.get(url + "/health", timeout=5)
            now = (r.status_code, r.json())
        except httpx.HTTPError as err:
            now = (0, {"error": type(err).__name__})
        if now != last:
            say("health", json.dumps(now))
            last = now
        time.sleep(0.2)
MODEL = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
threading.Thread(target=health, daemon=True).start()
threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
for t in threads:
    t.start()
while min(progress) < 3 and any(t.is_alive() for t in threads):
    time.sleep(0.05)
say("progress")
for t in threads:
    t.join()
done.set()
say("texts", json.dumps(texts))
"""

STREAM_PROMPTS = [[(11 * i + 5) % 400 + 3 for i in range(n)] for n in (4, 9, 30)]
STREAM_TOKENS = 40  # a fault lands after each stream's third chunk: mid-stream


class Streams:
    """The streaming client of `_STREAMS`, run inside host 1; its lines read in a thread."""

    def __init__(self, cluster, port: int):
        self.lines: list[tuple[float, str, str]] = []  # (seconds since start, kind, payload)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cluster.head.argv(sys.executable, "-c", _STREAMS, f"http://127.0.0.1:{port}", json.dumps(STREAM_PROMPTS),
                              str(STREAM_TOKENS)),
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, _, payload = line.strip().partition(" ")
            self.lines.append((time.monotonic() - self.started, kind, payload))

    def wait_for(self, test, timeout_s: float, what: str, logs=()) -> tuple[float, str, str]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if test(line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-5000:]}" for p in logs if p.exists())
        raise AssertionError(f"no {what} after {timeout_s} s; client said {self.lines[-20:]}\n"
                             f"{self.proc.stderr.read() if self.proc.poll() is not None else ''}\n{tails}")

    def texts(self, timeout_s: float, logs=()) -> list[str]:
        return json.loads(self.wait_for(lambda line: line[1] == "texts", timeout_s, "texts", logs)[2])

    def healths(self) -> list[tuple[float, int, dict]]:
        return [(t, *json.loads(p)) for t, kind, p in self.lines if kind == "health"]


def _pid_of(log, rank: int) -> int:
    found = re.findall(rf"rank {rank} \(tp \d+, pp \d+, pid (\d+)\)|rank {rank} pid (\d+)", log.read_text())
    assert found, log.read_text()[-3000:]
    return int(next(p for p in found[-1] if p))


@pytest.mark.timeout(500)
def test_the_headless_nodes_ranks_killed_and_the_node_restarted_cost_no_request(hosts, tiny_models, tmp_path):
    """(a) one rank of node 1 SIGKILLed (its node's launcher lives on): the head rebuilds the gang
    with a fresh rank there; (b) the whole of node 1 (launcher and ranks) SIGKILLed: the head's
    /health names node 1 and its address while it waits, and once node 1 is started again with the
    same command the gang is rebuilt; (c) the whole of node 1 stopped (SIGSTOP, a hung host): the head
    finds it silent, /health naming it; continued (SIGCONT), node 1 finds itself dropped, ends its
    stale ranks and rejoins by itself (the same process), and the gang is rebuilt with it. Every
    stream resumes with an undisturbed run's greedy text."""
    model = tiny_models("llama")
    began = time.monotonic()
    head_log, node_log, node_log2 = tmp_path / "head.log", tmp_path / "node1.log", tmp_path / "node1-again.log"
    node_cmd = _serve(model, "--node-rank", "1", "--master-addr", hosts.head.ip, "--headless",
                      "--dist-init-timeout", "90")
    head = hosts.spawn(hosts.head, _serve(model, "--node-rank", "0", "--master-addr", hosts.head.ip, "--port",
                                          str(PORT), "--dist-init-timeout", "90", "--step-timeout", "30",
                                          "--max-recoveries", "4"), head_log)
    node = hosts.spawn(hosts.worker, node_cmd, node_log)
    logs = (head_log, node_log, node_log2)
    try:
        query_completions(hosts, hosts.head, PORT, [[5]], 1, head, head_log)  # healthy, warmed up
        print(f"serving {time.monotonic() - began:.1f} s after the start")
        undisturbed = Streams(hosts, PORT).texts(240, logs)

        # (a) one rank of node 1.
        victim = _pid_of(head_log, 2)
        streams = Streams(hosts, PORT)
        streams.wait_for(lambda line: line[1] == "progress", 120, "progress", logs)
        killed_at = time.monotonic() - streams.started
        os.kill(victim, signal.SIGKILL)
        assert streams.texts(240, logs) == undisturbed
        back = [t for t, status, _ in streams.healths() if status == 200 and t > killed_at]
        print(f"(a) rank 2 SIGKILLed: serving again {back[0] - killed_at:.1f} s later")
        _, status, last = streams.healths()[-1]
        assert (status, last["state"], last["failed_rank"], last["recoveries"]) == (200, "serving", 2, 1), last
        assert last["reason"] == f"node 1: rank 2 (pid {victim}) was killed by signal 9", last
        assert node.poll() is None, node_log.read_text()[-4000:]  # the node stays, with new ranks
        assert "told node 0, which rebuilds the gang" in node_log.read_text()

        # (b) the whole of node 1, then started again.
        streams = Streams(hosts, PORT)
        streams.wait_for(lambda line: line[1] == "progress", 120, "progress", logs)
        killed_at = time.monotonic() - streams.started
        for pid in hosts.worker.pids():
            os.kill(pid, signal.SIGKILL)
        waiting = streams.wait_for(lambda line: line[1] == "health" and "waiting for node 1 (10.77.0.2)" in line[2],
                                   60, "health naming node 1", logs)
        status, body = json.loads(waiting[2])
        assert (status, body["state"]) == (503, "recovering"), body
        assert body["reason"].startswith("waiting for node 1 (10.77.0.2) to rejoin; it went away"), body
        node.wait(10)
        time.sleep(2)  # the head keeps waiting while the node is away
        assert list(streams.healths()[-1][1:]) == json.loads(waiting[2]), streams.healths()
        node = hosts.spawn(hosts.worker, node_cmd, node_log2)
        restarted_at = time.monotonic() - streams.started
        assert streams.texts(240, logs) == undisturbed
        back = [t for t, status, _ in streams.healths() if status == 200 and t > killed_at]
        print(f"(b) node 1 killed: {waiting}; serving again {back[0] - restarted_at:.1f} s after its restart "
              f"({back[0] - killed_at:.1f} s after the kill)")
        assert streams.healths()[-1][2]["recoveries"] == 2, streams.healths()

        # (c) the whole of node 1 hung (SIGSTOP): its silence is seen before the step timeout (30 s).
        streams = Streams(hosts, PORT)
        streams.wait_for(lambda line: line[1] == "progress", 120, "progress", logs)
        stopped = hosts.worker.pids()
        hung_at = time.monotonic() - streams.started
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)

        def health_says(start: str):
            return lambda line: line[1] == "health" and json.loads(line[2])[1].get("reason", "").startswith(start)

        silent = "node 1 (10.77.0.2) sent nothing for 20 s"  # HeadNodes' NODE_SILENCE_S
        lost = streams.wait_for(health_says(silent), 60, "node 1 lost", logs)
        status, body = json.loads(lost[2])
        assert (status, body["state"], body["reason"]) == (503, "recovering", silent), body
        # The head's step may still wait on a stopped rank of node 1 (rank 0 collecting the last
        # stage's result over gloo): its kill reaches only node 0's ranks, and StopRanks cannot reach
        # a node it dropped. Continued, node 1 finds its connection to the head closed: it ends its
        # stale ranks (which ends that step) and rejoins by itself, and the rebuild goes on with it.
        continued_at = time.monotonic() - streams.started
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        assert streams.texts(240, logs) == undisturbed
        assert node.poll() is None, node_log2.read_text()[-4000:]  # the same process, not restarted
        text = node_log2.read_text()
        assert re.search(r"node 1: lost the head \(the head at 10\.77\.0\.1:\d+ .*\); stopped this node's ranks; "
                         r"rejoining", text), text[-4000:]
        assert "node 1: rejoined the head at 10.77.0.1:" in text, text[-4000:]
        back = [t for t, status, _ in streams.healths() if status == 200 and t > hung_at]
        print(f"(c) node 1 stopped: lost {lost[0] - hung_at:.1f} s later; continued at once, it rejoined; serving "
              f"again {back[0] - continued_at:.1f} s after the continue ({back[0] - hung_at:.1f} s after the stop)")
        _, status, last = streams.healths()[-1]
        assert (status, last["state"], last["recoveries"]) == (200, "serving", 3), streams.healths()
    finally:
        head_rc = stop(head)
        try:
            node_rc = node.wait(40)
        except subprocess.TimeoutExpired:
            node.kill()
            node_rc = None
        hosts.worker.kill_all()
        hosts.head.kill_all()
    assert head_rc == 0, head_log.read_text()[-4000:]
    assert node_rc == 0, node_log2.read_text()[-4000:]
