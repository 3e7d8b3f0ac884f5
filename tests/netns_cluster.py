"""Two real hosts on one machine, for the multi-node tests: network namespaces joined by a veth pair.

Host 1 is 10.77.0.1/24 and host 2 10.77.0.2/24; those addresses exist only inside the two
namespaces, each of which also has its own loopback. The test process stays in the root
namespace and cannot reach them: everything that talks to a host (Ray, `strata serve`, the
OpenAI client) runs inside a namespace through `ip netns exec`.

Teardown ends exactly the processes inside our namespaces (`ip netns pids`), never by name:
`ray stop` would kill every Ray on the machine, including the test session's own.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.77.0"
RAY_PORT = 6379
RAY = str(Path(sys.executable).parent / "ray")


def netns_unavailable() -> str | None:
    """Why these tests cannot run here, or None. Creating a namespace is the only real test."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"strata-probe-{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ip netns` is not available ({err}); install iproute2"
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@dataclass
class Host:
    ns: str
    ip: str
    temp_dir: str

    def argv(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *cmd]

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process in this namespace, SIGKILL to what is left after `grace_s`."""
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)


@dataclass
class TwoHosts:
    hosts: list[Host]
    env: dict[str, str] = field(default_factory=dict)  # token auth etc., for every process we start

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def worker(self) -> Host:
        return self.hosts[1]

    def spawn(self, host: Host, cmd: list[str], log: Path, **extra_env: str) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(host.argv(*cmd), cwd=REPO, env={**self.env, **extra_env}, stdout=out,
                                    stderr=subprocess.STDOUT)

    def run(self, host: Host, cmd: list[str], timeout_s: float, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(host.argv(*cmd), cwd=REPO, env={**self.env, **extra_env}, capture_output=True,
                              text=True, timeout=timeout_s)

    def start_ray(self, cpus: int = 2) -> str:
        """A Ray head on host 1 and a worker on host 2 (token auth on, own temp dirs); the address."""
        address = f"{self.head.ip}:{RAY_PORT}"
        common = ["--num-cpus", str(cpus), "--num-gpus", "0", "--disable-usage-stats"]
        for host, role in ((self.head, ["--head", "--port", str(RAY_PORT), "--include-dashboard", "false"]),
                           (self.worker, ["--address", address])):
            done = self.run(host, [RAY, "start", *role, "--node-ip-address", host.ip, "--temp-dir", host.temp_dir,
                                   *common], timeout_s=120)
            assert done.returncode == 0, f"ray start on {host.ip} failed:\n{done.stdout}\n{done.stderr}"
        return address


@contextmanager
def two_hosts() -> Iterator[TwoHosts]:
    """Creates the namespaces and the veth pair; removes them, and every process in them, after."""
    tag = f"{os.getpid() % 100000}"
    hosts = [Host(f"strata-{tag}-h{i}", f"{SUBNET}.{i}", tempfile.mkdtemp(prefix=f"strata-h{i}-")) for i in (1, 2)]
    veth = [f"stv{tag}a", f"stv{tag}b"]  # interface names: at most 15 characters
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STRATA_HOST_IP", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0",
               PYTHONUNBUFFERED="1")
    try:
        for host in hosts:
            _ip("netns", "add", host.ns)
        _ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for host, dev in zip(hosts, veth, strict=True):
            _ip("link", "set", dev, "netns", host.ns)
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", dev)
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "link", "set", dev, "up")
        yield TwoHosts(hosts, env)
    finally:
        for host in hosts:
            host.kill_all()
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True, timeout=30)
            subprocess.run(["rm", "-rf", host.temp_dir], capture_output=True, timeout=60)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


# Run inside host 1 by `query_completions`: waits for /health, then one greedy completion per
# prompt (token ids in, text out), printed as JSON on the last line.
_CLIENT = """
import json, sys, time
import httpx, openai
url, prompts, max_tokens, timeout_s = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout_s
while True:
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            break
    except httpx.HTTPError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"no healthy server at {url} after {timeout_s} s")
    time.sleep(0.5)
client = openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
model = client.models.list().data[0].id
outs = [client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True}) for p in prompts]
print(json.dumps([[o.choices[0].text, o.usage.completion_tokens] for o in outs]))
"""


def query_completions(cluster: TwoHosts, host: Host, port: int, prompts: list[list[int]], max_tokens: int,
                      server: subprocess.Popen, log: Path, timeout_s: float = 240.0) -> list[tuple[str, int]]:
    """(text, completion tokens) per prompt from the server on `host`, asked from inside `host`."""
    client = subprocess.Popen(host.argv(sys.executable, "-c", _CLIENT, f"http://127.0.0.1:{port}",
                                        json.dumps(prompts), str(max_tokens), str(timeout_s)),
                              cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s + 60
    while client.poll() is None:
        if server.poll() is not None:
            client.kill()
            raise AssertionError(f"server exited with {server.returncode}:\n{log.read_text()[-6000:]}")
        if time.monotonic() > deadline:
            client.kill()
            raise AssertionError(f"client timed out; server log:\n{log.read_text()[-6000:]}")
        time.sleep(0.5)
    out, err = client.communicate()
    assert client.returncode == 0, f"client failed: {err[-3000:]}\nserver log:\n{log.read_text()[-6000:]}"
    return [tuple(x) for x in json.loads(out.strip().splitlines()[-1])]


def hf_reference_texts(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[str]:
    """Hugging Face greedy continuations, decoded as the server decodes (special tokens skipped)."""
    from transformers import AutoTokenizer

    from tests.hf_reference import hf_greedy

    tok = AutoTokenizer.from_pretrained(model_dir)
    # The server holds back a trailing incomplete character, as the offline parity tests allow.
    return [tok.decode(hf_greedy(model_dir, p, max_tokens).tokens, skip_special_tokens=True).rstrip("\ufffd")
            for p in prompts]


def stop(proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """Ctrl-C, as a user would; SIGKILL if it does not stop in time (the default is above the
    server's own bound on stopping Serve, app/server/launch.py, with room for a loaded machine).
    Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode
