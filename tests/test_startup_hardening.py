"""Start-up on a shared machine: which Ray Strata joins (only one the user named, or the one
`ray start` recorded here if it answers; else a private one of its own), that every start-up wait
is bounded and Ctrl-C ends it, that a private Ray listens on loopback only, and that the API key
comes from --api-key, STRATA_API_KEY or VLLM_API_KEY, with the start-up log saying whether auth is on.

Nothing here touches the machine's own Ray files: each test points Ray at a temporary directory
(RAY_TMPDIR), where it looks for the recorded cluster and where a private Ray keeps its session.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from strata.app import ray_cluster
from strata.app.ray_cluster import RayUnavailable, ray_target
from strata.app.server.settings import ServerSettings
from strata.config import EngineConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ray_tmp(monkeypatch):
    """A short RAY_TMPDIR of this test's own (Ray's socket paths must stay under ~107 bytes), no
    RAY_ADDRESS. Returns the path of the address file Ray would read there."""
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (Path(root) / "ray").mkdir()
    yield Path(root) / "ray" / "ray_current_cluster"
    shutil.rmtree(root, ignore_errors=True)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def listener():
    """A TCP port on loopback that accepts connections (a cluster that answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# ---- which Ray: the decision ----

def test_nothing_named_and_nothing_recorded_starts_a_private_ray(ray_tmp):
    target = ray_target(EngineConfig())
    assert target.kind == "private" and "none is recorded" in target.why


def test_a_stale_address_file_is_not_joined(ray_tmp):
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    start = time.monotonic()
    target = ray_target(EngineConfig())
    assert time.monotonic() - start < ray_cluster.LOCAL_RAY_PROBE_S + 1
    assert target.kind == "private" and "does not answer" in target.why and "stale" in target.why


@pytest.mark.parametrize("recorded, says", [
    ("10.255.255.1:6379", "not on this machine"),  # never probed: a foreign address may hang
    ("203.0.113.7:6379", "not on this machine"),
    ("garbage", "not on this machine"),
])
def test_a_recorded_address_elsewhere_is_not_joined(ray_tmp, recorded, says):
    ray_tmp.write_text(recorded)
    start = time.monotonic()
    target = ray_target(EngineConfig())
    assert time.monotonic() - start < 1.0
    assert target.kind == "private" and says in target.why


def test_a_recorded_cluster_that_answers_is_joined(ray_tmp, listener):
    ray_tmp.write_text(f"127.0.0.1:{listener}")
    target = ray_target(EngineConfig())
    assert (target.kind, target.address) == ("recorded", f"127.0.0.1:{listener}")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the file to another user")
def test_another_users_address_file_is_not_joined(ray_tmp, listener):
    ray_tmp.write_text(f"127.0.0.1:{listener}")
    os.chown(ray_tmp, 4242, -1)
    target = ray_target(EngineConfig())
    assert target.kind == "private" and "another user (uid 4242)" in target.why


def test_a_named_cluster_is_the_one_used(ray_tmp, listener, monkeypatch):
    ray_tmp.write_text(f"127.0.0.1:{listener}")  # named beats recorded
    assert ray_target(EngineConfig(ray_address="10.0.0.1:6379")).address == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert ray_target(EngineConfig()).kind == "named" and ray_target(EngineConfig()).address == "10.0.0.2:6379"
    assert ray_target(EngineConfig(ray_address="10.0.0.1:6379")).address == "10.0.0.1:6379"  # the argument wins
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_target(EngineConfig()).kind == "private"


def test_ray_address_auto_with_nothing_to_join_fails_naming_why(ray_tmp, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    with pytest.raises(RayUnavailable, match="RAY_ADDRESS=auto: no Ray cluster to join.*does not answer"):
        ray_target(EngineConfig())


def test_a_named_cluster_that_does_not_answer_fails_in_bounded_time(ray_tmp, monkeypatch):
    monkeypatch.setattr(ray_cluster, "NAMED_RAY_WAIT_S", 1.5)
    address = f"127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(RayUnavailable) as err:
        ray_cluster._wait_for(ray_target(EngineConfig(ray_address=address)))
    assert time.monotonic() - start < 4
    assert f"the Ray cluster at {address} (ray_address={address}) did not answer within 2 s" in str(err.value)
    assert "leave --address and RAY_ADDRESS unset" in str(err.value)


def test_a_named_cluster_that_comes_up_while_waiting_is_joined(ray_tmp):
    port = closed_port()
    late = socket.socket()

    def come_up() -> None:
        time.sleep(1.0)
        late.bind(("127.0.0.1", port))
        late.listen()

    threading.Thread(target=come_up, daemon=True).start()
    try:
        ray_cluster._wait_for(ray_target(EngineConfig(ray_address=f"127.0.0.1:{port}")))
    finally:
        late.close()


class FakeRay:
    """ray.is_initialized / ray.init, recording how ensure_ray called init and whether a private
    Ray would bind to loopback at that moment."""

    def __init__(self, monkeypatch):
        import ray
        from ray._private import ray_constants

        self.constants = ray_constants
        self.calls: list[dict] = []
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", self.init)

    def init(self, **kwargs):
        from types import SimpleNamespace

        self.calls.append(dict(kwargs, loopback=not self.constants.ENABLE_RAY_CLUSTER))
        return SimpleNamespace(address_info={"gcs_address": "127.0.0.1:1"})


def test_ensure_ray_starts_the_private_ray_on_loopback_only(ray_tmp, monkeypatch, caplog):
    ray_tmp.write_text(f"127.0.0.1:{closed_port()}")
    fake = FakeRay(monkeypatch)
    before = fake.constants.ENABLE_RAY_CLUSTER
    with caplog.at_level("INFO", logger="strata"):
        ray_cluster.ensure_ray(EngineConfig(tensor_parallel_size=2))
    [call] = fake.calls
    # "local": a new Ray, never the recorded one (ray.init(address=None) would join the stale file's).
    assert call["address"] == "local" and call["loopback"] and call["include_dashboard"] is False
    assert fake.constants.ENABLE_RAY_CLUSTER == before  # only while it starts
    assert "starting a private local Ray (the Ray cluster recorded in" in caplog.text
    assert "listening on 127.0.0.1 only" in caplog.text


def test_ensure_ray_joins_what_it_picked(ray_tmp, listener, monkeypatch):
    fake = FakeRay(monkeypatch)
    ray_cluster.ensure_ray(EngineConfig(ray_address=f"127.0.0.1:{listener}"))
    ray_tmp.write_text(f"127.0.0.1:{listener}")
    ray_cluster.ensure_ray(EngineConfig())
    assert [(c["address"], c["loopback"]) for c in fake.calls] == [(f"127.0.0.1:{listener}", False), (None, False)]


# ---- the real thing, in a child process ----

_PRIVATE_RAY = """
import json, logging, time, psutil, ray
from strata.app.ray_cluster import ensure_ray
from strata.config import EngineConfig

logging.basicConfig(level=logging.INFO)
start = time.monotonic()
ensure_ray(EngineConfig())
elapsed = time.monotonic() - start
me = psutil.Process()
listening = set()
for proc in [me, *me.children(recursive=True)]:
    try:
        listening |= {(proc.name(), c.laddr.ip) for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    except psutil.Error:
        pass
print("RESULT " + json.dumps({"elapsed": elapsed, "gcs": ray.get_runtime_context().gcs_address,
                              "node_ip": ray.util.get_node_ip_address(), "listening": sorted(listening)}))
ray.shutdown()
"""


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STRATA_API_KEY", "VLLM_API_KEY")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    return env


def test_a_stale_address_file_gets_a_private_ray_on_loopback_within_seconds(ray_tmp):
    stale = f"127.0.0.1:{closed_port()}"
    ray_tmp.write_text(stale)
    out = subprocess.run([sys.executable, "-c", _PRIVATE_RAY], capture_output=True, text=True, timeout=120,
                         env=_child_env(RAY_TMPDIR=os.environ["RAY_TMPDIR"]), cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["elapsed"] < 60  # a Ray start on a busy 2-core machine; a stale join hung for minutes
    assert result["gcs"] != stale and result["gcs"].startswith("127.0.0.1:")
    assert result["node_ip"] == "127.0.0.1"
    assert "does not answer" in out.stderr and "starting a private local Ray" in out.stderr
    # Item 11: everything the private Ray opened (GCS, raylet, workers, the metrics agent) is on loopback.
    exposed = [(name, ip) for name, ip in result["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert result["listening"] and not exposed, result["listening"]


def test_ctrl_c_during_a_start_up_wait_ends_it_at_once(ray_tmp, smollm2_dir):
    """`strata serve --address` a cluster that is not up: it waits (bounded) for it; Ctrl-C
    ends the wait within seconds, saying so, and nothing is started on the way out."""
    address = f"127.0.0.1:{closed_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "strata.app.cli", "serve", smollm2_dir, "--address", address, "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env=_child_env(RAY_TMPDIR=os.environ["RAY_TMPDIR"]))
    seen: list[str] = []
    waiting = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            seen.append(line)
            if "waiting up to" in line:
                waiting.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert waiting.wait(90), "".join(seen)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=5)
        assert time.monotonic() - interrupted < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    log = "".join(seen)
    assert rc == 0, log
    assert f"interrupted while waiting for the Ray cluster at {address}" in log
    assert "private local Ray" not in log and "Started a local Ray" not in log


# ---- the API key ----

@pytest.fixture
def key_env(monkeypatch):
    for name in ("STRATA_API_KEY", "VLLM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_vllm_api_key_is_honoured(key_env):
    assert ServerSettings().api_key is None
    key_env.setenv("VLLM_API_KEY", "from-vllm")
    assert ServerSettings().api_key == "from-vllm"
    key_env.setenv("STRATA_API_KEY", "from-strata")
    assert ServerSettings().api_key == "from-strata"  # Strata's own name first
    key_env.setenv("STRATA_API_KEY", "")
    assert ServerSettings().api_key == "from-vllm"  # empty is unset


def test_the_api_key_flag_wins_over_both_variables(key_env):
    from strata.app.serve_cli import add_serve_parser, configs_from_args

    key_env.setenv("VLLM_API_KEY", "v")
    key_env.setenv("STRATA_API_KEY", "s")
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    _, settings = configs_from_args(parser.parse_args(["serve", "--api-key", "flag"]))
    assert settings.api_key == "flag"
    _, settings = configs_from_args(parser.parse_args(["serve"]))
    assert settings.api_key == "s"


def test_the_serve_yaml_path_reads_vllm_api_key_too(key_env):
    from strata.app.server.serve_app import split_args

    key_env.setenv("VLLM_API_KEY", "v")
    assert split_args({})[1].api_key == "v"
    assert split_args({"api_key": "k"})[1].api_key == "k"


def test_the_start_up_log_says_whether_auth_is_on(key_env, smollm2_dir, caplog):
    from strata.app.server.launch import _prepare

    config = EngineConfig(model=smollm2_dir, max_model_len=256)
    key_env.setenv("VLLM_API_KEY", "v")
    with caplog.at_level("INFO", logger="strata"):
        _prepare(config, ServerSettings())
    assert "API key auth is on (key from $VLLM_API_KEY)" in caplog.text
    key_env.delenv("VLLM_API_KEY")
    caplog.clear()
    with caplog.at_level("INFO", logger="strata"):
        _prepare(config, ServerSettings(host="0.0.0.0"))
    [record] = [r for r in caplog.records if "API key auth" in r.getMessage()]
    assert record.levelname == "WARNING"  # open, and reachable from elsewhere
    assert "API key auth is OFF: every route at http://0.0.0.0:8000 answers anyone" in record.getMessage()
    assert "VLLM_API_KEY" in record.getMessage()


def test_auth_summary_names_the_flag_when_the_key_came_from_it(key_env):
    assert "key from --api-key" in ServerSettings(api_key="k").auth_summary()
