"""The mp backend across two real hosts (network namespaces, tests/netns_cluster.py), no Ray:
node 0 on host 1 serves the API, node 1 on host 2 runs headless. tp=2 x pp=2 answers as Hugging
Face does with a stage on each host; the headless node exits once the head stops, or is killed;
a node pointed at a wrong master, and a head whose other node never comes, fail in time naming
what is missing; `strata doctor` with the same node flags checks both hosts and their link."""

from __future__ import annotations

import re
import subprocess
import sys
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
    model = tiny_models("llama")
    head_log, node_log = tmp_path / "head.log", tmp_path / "node1.log"
    head = hosts.spawn(hosts.head, _serve(model, "--node-rank", "0", "--master-addr", hosts.head.ip, "--port",
                                          str(PORT), "--dist-init-timeout", "60"), head_log)
    node = hosts.spawn(hosts.worker, _serve(model, "--node-rank", "1", "--master-addr", hosts.head.ip, "--headless",
                                            "--dist-init-timeout", "60"), node_log)
    try:
        deadline = time.monotonic() + 90
        while "ranks 2-3 started" not in node_log.read_text() and time.monotonic() < deadline:
            assert node.poll() is None, node_log.read_text()[-3000:]
            time.sleep(0.2)
        head.kill()  # no shutdown plan, no Bye: the connection just ends
        node_rc = node.wait(30)
    finally:
        for proc in (head, node):
            if proc.poll() is None:
                proc.kill()
        hosts.head.kill_all()  # the killed head's own rank process, orphaned
    text = node_log.read_text()
    assert node_rc == 1, text[-3000:]
    assert "strata serve: error: node 1: the head at 10.77.0.1:" in text, text[-3000:]
    assert "went away" in text or "rank process(es) died" in text, text[-3000:]


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
