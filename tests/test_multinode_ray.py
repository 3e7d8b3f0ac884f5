"""The Ray backend across two real hosts (network namespaces, tests/netns_cluster.py): a Ray head
on host 1 and a worker on host 2, token auth on. `strata serve -tp 2 -pp 2` puts one stage on
each host and answers through the OpenAI API as Hugging Face does; `strata doctor` reports both
hosts, then names the one whose Ray was stopped. Tests run in order: the last one stops host 2."""

from __future__ import annotations

import re
import sys
import time

import pytest

from tests.netns_cluster import (
    RAY,
    hf_reference_texts,
    netns_unavailable,
    query_completions,
    stop,
    two_hosts,
)

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(n)] for n in (5, 40)]
MAX_TOKENS = 12
PORT = 8000  # inside host 1's own network namespace, so no clash with anything outside


@pytest.fixture(scope="module")
def ray_hosts():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with two_hosts() as cluster:
        address = cluster.start_ray(cpus=2)  # 2 logical CPUs per host: one tp=2 stage each
        yield cluster, address


def test_serve_tp2_pp2_puts_a_stage_on_each_host_and_matches_hf(ray_hosts, tiny_models, tmp_path):
    cluster, address = ray_hosts
    model = tiny_models("llama")
    log = tmp_path / "serve.log"
    server = cluster.spawn(cluster.head, [sys.executable, "-m", "strata.app.cli", "serve", model, "-tp", "2",
                                          "-pp", "2", "--distributed-executor-backend", "ray", "--port", str(PORT),
                                          "--max-model-len", "256"], log,
                           RAY_ADDRESS=address, NCCL_DEBUG="INFO", MULTINODE_MARK="1",
                           STRATA_FORWARD_ENV="MULTINODE_MARK")
    try:
        got = query_completions(cluster, cluster.head, PORT, PROMPTS, MAX_TOKENS, server, log)
    finally:
        rc = stop(server)
    text = log.read_text()
    assert [t for t, _ in got] == hf_reference_texts(model, PROMPTS, MAX_TOKENS)
    assert all(n == MAX_TOKENS for _, n in got)
    assert re.search(r"stage 0 -> \S+ \(10\.77\.0\.1\) -> \[rank 0: cpu, rank 1: cpu\]", text), text[-4000:]
    assert re.search(r"stage 1 -> \S+ \(10\.77\.0\.2\) -> \[rank 2: cpu, rank 3: cpu\]", text), text[-4000:]
    assert "stage 0 -> 10.77.0.1 (head), stage 1 -> 10.77.0.2" in text  # the placement map
    # The driver and the ingress sit on the head; NCCL_* and listed variables reach host 2's ranks,
    # whose gloo uses the interface holding host 2's address.
    assert re.search(r"\(Driver pid=\d+\)", text) and re.search(r"\(ServeReplica:strata:StrataIngress pid=\d+\)", text)
    remote = [ln for ln in text.splitlines() if "ip=10.77.0.2" in ln and "rank 3 on 10.77.0.2 via stv" in ln]
    assert remote and "NCCL_DEBUG=INFO" in remote[0] and "present: MULTINODE_MARK" in remote[0], text[-4000:]
    assert rc == 0, text[-4000:]


def test_a_driver_node_outside_the_cluster_fails_fast_naming_it(ray_hosts, tiny_models):
    cluster, address = ray_hosts
    done = cluster.run(cluster.head, [sys.executable, "-m", "strata.app.cli", "serve", tiny_models("llama"),
                                      "--distributed-executor-backend", "ray", "--driver-node", "10.77.0.9",
                                      "--port", str(PORT)], timeout_s=120, RAY_ADDRESS=address)
    assert done.returncode == 1
    assert "driver_node=10.77.0.9 is not a node of this Ray cluster (nodes: 10.77.0." in done.stderr, done.stderr


def test_a_wrong_token_is_refused(ray_hosts):
    cluster, address = ray_hosts
    done = cluster.run(cluster.head, [RAY, "status", "--address", address], timeout_s=60,
                       RAY_AUTH_TOKEN="0" * 32)
    assert done.returncode != 0
    assert "Authentication token is missing or incorrect" in done.stdout + done.stderr, done.stderr[-2000:]


def test_doctor_reports_both_hosts_then_names_the_stopped_one(ray_hosts):
    cluster, address = ray_hosts
    doctor = [sys.executable, "-m", "strata.app.cli", "doctor", "--address", address, "--timeout", "20"]
    done = cluster.run(cluster.head, doctor, timeout_s=120)
    assert done.returncode == 0, done.stdout + done.stderr
    import ray
    import torch
    import transformers

    for ip in ("10.77.0.1", "10.77.0.2"):
        row = next(ln for ln in done.stdout.splitlines() if ln.startswith(ip))
        assert torch.__version__ in row and ray.__version__ in row and transformers.__version__ in row, row
        assert row.rstrip().endswith("ok") and " stv" in row, row
    assert re.search(r"10\.77\.0\.1 <-> 10\.77\.0\.2\s+gloo TCP\s+4 MiB .* GB/s\s+ok", done.stdout), done.stdout

    cluster.worker.kill_all()  # host 2's Ray goes away
    started = time.monotonic()
    done = cluster.run(cluster.head, [*doctor[:-1], "8"], timeout_s=120)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^10\.77\.0\.2 .*NOT ANSWERING", done.stdout, re.M), done.stdout
    assert "ERROR: node 10.77.0.2: not answering" in done.stdout
    assert elapsed < 8 + 40, elapsed  # its timeout, plus starting Python and joining Ray on two busy cores
