"""Which Ray cluster Strata joins, and starting a private one when there is none to join.

`ensure_ray` joins only a cluster the user named (`ray_address` / --address, else RAY_ADDRESS),
waiting a bounded time for its GCS to answer, or the one `ray start` recorded on this machine if
it is this user's and its GCS answers at once; otherwise it starts a private local Ray that
listens on loopback only. Never a cluster found by scanning for other processes. Every wait is
bounded, and Ctrl-C ends it at once. The private Ray's processes run in sessions of their own,
so a signal to this process's group (a terminal's Ctrl-C, systemd's SIGTERM) reaches the server,
which drains, and not the Ray under it; `ray.shutdown()` still stops them.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from strata.config import EngineConfig

logger = logging.getLogger("strata")

# How long a cluster the user named may take to answer (it may be starting), and how long one
# found on this machine, unnamed, gets before Strata starts its own instead.
NAMED_RAY_WAIT_S = 10.0
LOCAL_RAY_PROBE_S = 2.0


class RayUnavailable(ConnectionError):
    """The Ray cluster the user named did not answer in time."""


@dataclass(frozen=True)
class RayTarget:
    """Which Ray to use. named: the cluster the user named; recorded: the one `ray start` recorded
    on this machine (it answered); private: none, start a private local Ray. `why` is for the log."""

    kind: Literal["named", "recorded", "private"]
    address: str | None
    why: str


def _ray_address_file() -> str:
    """The file `ray start` writes its address to (Ray's own rule: $RAY_TMPDIR, $TMPDIR or /tmp, then ray/)."""
    try:
        from ray._common.utils import get_ray_address_file

        return get_ray_address_file(None)
    except (ImportError, AttributeError):  # a Ray that moved it: the documented default
        return os.path.join(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp", "ray",
                            "ray_current_cluster")


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host:port`; None for anything else."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_this_machine(host: str) -> bool:
    from strata.distributed.sockets import local_ipv4_addresses

    return host in ("localhost", "::1") or host.startswith("127.") or host in local_ipv4_addresses()


def _answers(host: str, port: int, timeout_s: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout_s`, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return str(err) or type(err).__name__


def _gcs_answers(host: str, port: int, timeout_s: float) -> str | None:
    """None when host:port opens within `timeout_s` and a Ray GCS answers there (its
    GetClusterId, over gRPC), else why not. An open port alone is not a Ray: a stale address
    file's port that another process took (or one that accepts and never answers) has
    ray.init retry "Failed to connect to GCS" for minutes, deaf to Ctrl-C. A GCS that wants
    Ray's auth token says so, and that is a GCS's answer too (ray.init finds the token)."""
    deadline = time.monotonic() + timeout_s
    failure = _answers(host, port, timeout_s)
    if failure is not None:
        return failure
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2
    except ImportError:  # a Ray without them: the open port has to do
        return None
    channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        get_cluster_id = channel.unary_unary(
            "/ray.rpc.NodeInfoGcsService/GetClusterId",
            request_serializer=gcs_service_pb2.GetClusterIdRequest.SerializeToString,
            response_deserializer=gcs_service_pb2.GetClusterIdReply.FromString)
        get_cluster_id(gcs_service_pb2.GetClusterIdRequest(), timeout=max(0.1, deadline - time.monotonic()))
        return None
    except grpc.RpcError as err:
        code = err.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return None
        return f"the port is open but no Ray GCS answers there ({code.name})"
    finally:
        channel.close()


def ray_target(config: EngineConfig) -> RayTarget:
    """The cluster the user named (`ray_address` / --address, else RAY_ADDRESS), else the one
    `ray start` recorded on this machine if it is this user's and its GCS answers within
    LOCAL_RAY_PROBE_S (an open port is not enough), else none: a private local Ray. Never a
    cluster found by scanning for other processes (Ray's address="auto" does: another session's
    Ray, which vanishes with it), and never one recorded but gone (its address file outlives it,
    and joining it hangs)."""
    named = config.ray_address or os.environ.get("RAY_ADDRESS")
    source = "ray_address" if config.ray_address else "RAY_ADDRESS"
    if named == "local":
        return RayTarget("private", None, f"{source}=local")
    if named and named != "auto":
        return RayTarget("named", named, f"{source}={named}")
    path = _ray_address_file()
    try:
        with open(path) as f:
            recorded = f.read().strip()
        owner = os.stat(path).st_uid
    except OSError:
        return RayTarget("private", None, f"no Ray cluster was named and none is recorded on this machine ({path})")
    where = _host_port(recorded)
    if owner != os.getuid():
        why = f"{path} was written by another user (uid {owner})"
    elif where is None or not _is_this_machine(where[0]):
        why = f"{path} names {recorded!r}, which is not on this machine"
    else:
        failure = _gcs_answers(*where, LOCAL_RAY_PROBE_S)
        if failure is None:
            return RayTarget("recorded", recorded, f"the Ray cluster recorded in {path}")
        why = f"the Ray cluster recorded in {path} ({recorded}) does not answer ({failure}): a stale address file"
    if named == "auto":
        raise RayUnavailable(f"RAY_ADDRESS=auto: no Ray cluster to join on this machine ({why})")
    return RayTarget("private", None, why)


def _wait_for(target: RayTarget) -> None:
    """Waits up to NAMED_RAY_WAIT_S for a named cluster to answer; Ctrl-C stops at once."""
    address = target.address or ""
    where = _host_port(address)
    if where is None:
        return  # a form Ray resolves itself (e.g. a hostname without port): ray.init reports it
    # A GCS must answer at host:port; ray:// is Ray Client's server, which speaks another protocol.
    probe = _answers if address.startswith("ray://") else _gcs_answers
    deadline = time.monotonic() + NAMED_RAY_WAIT_S
    try:
        failure = probe(*where, min(2.0, NAMED_RAY_WAIT_S))
        if failure is None:
            return
        logger.info("waiting up to %.0f s for the Ray cluster at %s (%s) to answer; Ctrl-C to stop",
                    NAMED_RAY_WAIT_S, target.address, target.why)
        while failure is not None and time.monotonic() < deadline:
            time.sleep(0.5)
            failure = probe(*where, max(0.1, min(2.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        logger.warning("interrupted while waiting for the Ray cluster at %s", target.address)
        raise
    if failure is not None:
        raise RayUnavailable(
            f"the Ray cluster at {target.address} ({target.why}) did not answer within {NAMED_RAY_WAIT_S:.0f} s "
            f"({failure}). Check that `ray start --head` runs there and the port is reachable, or leave "
            f"--address and RAY_ADDRESS unset to run on a private local Ray")


@contextmanager
def _loopback_node():
    """While a private Ray starts: its node address is 127.0.0.1, so every listener it opens
    (GCS, raylet, workers, the metrics agent's Prometheus endpoint) binds to loopback. Ray binds
    them to all interfaces for any other node address, and maps an explicit 127.0.0.1 to the
    host's address (resolve_ip_for_localhost) unless clusters are off, as on macOS."""
    try:
        from ray._private import ray_constants
    except ImportError:
        yield False
        return
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield False
        return
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield True
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


@contextmanager
def _own_sessions():
    """While a private Ray starts: each process it spawns (GCS, raylet and, under it, the
    workers; the dashboard agent, the log monitor) starts a session of its own. Else they share
    this process's group, and SIGTERM to it kills them (Ray only blocks SIGINT in them) while the
    server still drains onto them."""
    try:
        from ray._private import services
    except ImportError:
        yield
        return
    spawn = getattr(services, "ConsolePopen", None)
    if spawn is None:  # a Ray that moved it: the processes share our group, as before
        yield
        return

    class SessionPopen(spawn):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = SessionPopen
    try:
        yield
    finally:
        services.ConsolePopen = spawn


# The GCS address of the private Ray `ensure_ray` started in this process, if it did.
_private_gcs: str | None = None


def on_private_ray() -> bool:
    """Whether this process is connected to the private Ray `ensure_ray` started here: nobody
    else's work runs on it, and `ray.shutdown()` stops all of it (actors, placement groups)."""
    import ray

    if _private_gcs is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().gcs_address == _private_gcs
    except Exception:  # noqa: BLE001 - a Ray that cannot say: not known to be ours
        return False


def ensure_ray(config: EngineConfig) -> None:
    """Joins the cluster `ray_target` picks (a named one must answer within NAMED_RAY_WAIT_S, else
    RayUnavailable), or starts a private local Ray on loopback sized so every rank gets its
    logical slot. Says which in the log."""
    import ray

    if ray.is_initialized():
        return
    target = ray_target(config)
    if target.kind == "named":
        _wait_for(target)
        logger.info("joining the Ray cluster at %s (%s)", target.address, target.why)
        ray.init(address=target.address, log_to_driver=True)
        return
    if target.kind == "recorded":
        logger.info("joining the Ray cluster at %s (%s)", target.address, target.why)
        # address=None is Ray's own "the recorded cluster", with its token auth found as for `ray start`'s.
        ray.init(address=None, log_to_driver=True)
        return
    # Logical CPUs are only accounting: tiny CPU models may run more ranks than cores.
    num_cpus = max(os.cpu_count() or 1, config.world_size + 2)
    logger.info("starting a private local Ray (%s); to use a cluster, name it with --address or RAY_ADDRESS",
                target.why)
    with _loopback_node() as loopback, _own_sessions():
        # address="local": never the recorded cluster, which ray.init(address=None) would join.
        context = ray.init(address="local", num_cpus=num_cpus, log_to_driver=True, include_dashboard=False,
                           dashboard_host="127.0.0.1")
    global _private_gcs
    _private_gcs = context.address_info.get("gcs_address")
    logger.info("started a private local Ray at %s (%d logical CPUs, listening on %s)",
                context.address_info.get("gcs_address", "?"), num_cpus,
                "127.0.0.1 only" if loopback else "this node's addresses")
