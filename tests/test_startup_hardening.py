"""Start-up on a shared machine, the decision: which Ray Strata joins (only one the user named, or
the one `ray start` recorded here if it answers; else a private one of its own), each wait bounded,
against fake clusters in this process. The real start-ups, in child processes: tests/test_startup_live.py;
the API key: tests/test_api_key.py.

Nothing here touches the machine's own Ray files: each test points Ray at a temporary directory
(RAY_TMPDIR), where it looks for the recorded cluster and where a private Ray keeps its session.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from strata.app import ray_cluster
from strata.app.ray_cluster import RayUnavailable, ray_target
from strata.config import EngineConfig
from tests.ray_tmp_fixtures import closed_port

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def listener():
    """A TCP port on loopback that accepts connections and never answers: no Ray (a stale
    address file's port another process took, or a process that hangs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def start_fake_gcs(port: int = 0, token_required: bool = False):
    """A gRPC server on loopback that answers as a Ray GCS does to ray_cluster's probe
    (NodeInfoGcsService/GetClusterId); with `token_required`, as one with Ray's token auth does
    to a caller without the token. Returns (server, port)."""
    from concurrent import futures

    import grpc
    from ray.core.generated import gcs_service_pb2

    def get_cluster_id(request, context):
        if token_required:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "InvalidAuthToken: Authentication token is missing")
        return gcs_service_pb2.GetClusterIdReply(cluster_id=b"\x01" * 28)

    handler = grpc.method_handlers_generic_handler("ray.rpc.NodeInfoGcsService", {
        "GetClusterId": grpc.unary_unary_rpc_method_handler(
            get_cluster_id, request_deserializer=gcs_service_pb2.GetClusterIdRequest.FromString,
            response_serializer=gcs_service_pb2.GetClusterIdReply.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    assert port, "could not bind the fake GCS"
    server.start()
    return server, port


@pytest.fixture(params=[False, True], ids=["open", "token-auth"])
def fake_gcs(request):
    """A port on loopback where a (fake) Ray GCS answers: a cluster that answers."""
    server, port = start_fake_gcs(token_required=request.param)
    yield port
    server.stop(None)


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


def test_a_recorded_cluster_that_answers_is_joined(ray_tmp, fake_gcs):
    ray_tmp.write_text(f"127.0.0.1:{fake_gcs}")
    target = ray_target(EngineConfig())
    assert (target.kind, target.address) == ("recorded", f"127.0.0.1:{fake_gcs}")


def test_a_recorded_port_that_is_open_but_no_ray_is_not_joined(ray_tmp, listener):
    """The port answers TCP but no GCS answers there: ray.init would retry "Failed to connect
    to GCS" for minutes, deaf to Ctrl-C (issue 17 item 2's hang). A private Ray instead."""
    ray_tmp.write_text(f"127.0.0.1:{listener}")
    start = time.monotonic()
    target = ray_target(EngineConfig())
    assert time.monotonic() - start < ray_cluster.LOCAL_RAY_PROBE_S + 1.5
    assert target.kind == "private" and "no Ray GCS answers there" in target.why and "stale" in target.why


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


def test_a_named_port_that_is_open_but_no_ray_fails_in_bounded_time(ray_tmp, listener, monkeypatch):
    monkeypatch.setattr(ray_cluster, "NAMED_RAY_WAIT_S", 3.0)
    address = f"127.0.0.1:{listener}"
    start = time.monotonic()
    with pytest.raises(RayUnavailable, match="did not answer within 3 s .the port is open but no Ray GCS"):
        ray_cluster._wait_for(ray_target(EngineConfig(ray_address=address)))
    assert time.monotonic() - start < 3.0 + 2.5  # the last probe may start just before the limit


def test_a_named_cluster_that_comes_up_while_waiting_is_joined(ray_tmp):
    port = closed_port()
    late: list = []

    def come_up() -> None:
        time.sleep(1.0)
        late.append(start_fake_gcs(port)[0])

    threading.Thread(target=come_up, daemon=True).start()
    try:
        start = time.monotonic()
        ray_cluster._wait_for(ray_target(EngineConfig(ray_address=f"127.0.0.1:{port}")))
        assert late and time.monotonic() - start < ray_cluster.NAMED_RAY_WAIT_S
    finally:
        for server in late:
            server.stop(None)


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


def test_ensure_ray_joins_what_it_picked(ray_tmp, fake_gcs, monkeypatch):
    fake = FakeRay(monkeypatch)
    ray_cluster.ensure_ray(EngineConfig(ray_address=f"127.0.0.1:{fake_gcs}"))
    ray_tmp.write_text(f"127.0.0.1:{fake_gcs}")
    ray_cluster.ensure_ray(EngineConfig())
    assert [(c["address"], c["loopback"]) for c in fake.calls] == [(f"127.0.0.1:{fake_gcs}", False), (None, False)]
