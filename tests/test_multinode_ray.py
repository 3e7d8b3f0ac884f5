"""The Ray backend across two real hosts (network namespaces, tests/netns_cluster.py): a Ray head
on host 1 and a worker on host 2, token auth on. `strata serve -tp 2 -pp 2` puts one stage on
each host and answers through the OpenAI API as Hugging Face does; `strata doctor` reports both
hosts, then names the one whose Ray was stopped. Tests run in order: the last one stops host 2."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.netns_cluster import (
    RAY,
    REPO,
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


# Run inside host 1: one greedy stream; prints "tokens N" as they arrive, then the text as JSON.
_STREAM_CLIENT = """
import json, sys, time
import httpx, openai
url, prompt, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + 240
while True:
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit("no healthy server")
    time.sleep(0.5)
client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)
model = client.models.list().data[0].id
text, n = "", 0
for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "return_token_ids": True}):
    for c in chunk.choices:
        text += c.text
        n += len(c.model_extra.get("token_ids") or [])
        print("tokens", n, flush=True)
print(json.dumps([text, n]), flush=True)
"""


def test_a_killed_rank_on_the_worker_host_costs_no_token(ray_hosts, tiny_models, tmp_path):
    """SIGKILL of rank 3, on host 2, mid-stream: the driver (on host 1) rebuilds the gang with a
    stage on each host again and the stream ends with Hugging Face's text."""
    cluster, address = ray_hosts
    model = tiny_models("llama")
    log = tmp_path / "serve.log"
    server = cluster.spawn(cluster.head, [sys.executable, "-m", "strata.app.cli", "serve", model, "-tp", "2",
                                          "-pp", "2", "--distributed-executor-backend", "ray", "--port", str(PORT),
                                          "--max-model-len", "512"], log, RAY_ADDRESS=address)
    prompt, max_tokens = PROMPTS[1], 160
    client = subprocess.Popen(cluster.head.argv(sys.executable, "-c", _STREAM_CLIENT, f"http://127.0.0.1:{PORT}",
                                                json.dumps(prompt), str(max_tokens)),
                              cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = iter(client.stdout.readline, "")
        first = next(ln for ln in lines if ln.startswith("tokens") and int(ln.split()[1]) >= 5)
        pid = int(re.search(r"rank 3 \(tp 1, pp 1, pid (\d+)\) on", log.read_text()).group(1))
        assert pid in cluster.worker.pids(), "rank 3 runs on host 2"
        os.kill(pid, signal.SIGKILL)
        killed_at = int(first.split()[1])
        out, err = client.communicate(timeout=300)
        assert client.returncode == 0, err[-3000:] + log.read_text()[-4000:]
        text, n = json.loads(out.strip().splitlines()[-1])
        # The new gang keeps the layout: rank 3 on host 2 again, in a new process.
        new_pid = int(re.search(r"new gang up in .* rank 3 pid (\d+)", log.read_text()).group(1))
        assert new_pid != pid and new_pid in cluster.worker.pids()
    finally:
        if client.poll() is None:
            client.kill()
        rc = stop(server)
    served = log.read_text()
    assert n == max_tokens and killed_at < max_tokens - 20, (n, killed_at)
    assert text == hf_reference_texts(model, [prompt], max_tokens)[0]
    # The rank that died is named, not its peer whose collective broke with it.
    assert re.search(r"rank 3 failed \(rank 3's actor is gone .*recovering", served), served[-4000:]
    recovered = re.search(r"recovered in ([\d.]+) s", served)
    assert recovered, served[-4000:]
    print(f"two hosts, SIGKILL of rank 3 on host 2 at token {killed_at}: recovered in {recovered.group(1)} s")
    assert rc == 0, served[-4000:]


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
