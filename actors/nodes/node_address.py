"""Which address and network interface this node uses for our traffic.

The node's private address is STRATA_HOST_IP when set (as vLLM's VLLM_HOST_IP), else the address
Ray registered for this node, else the source address of the route toward the master (so an mp
node on a private network finds the interface that reaches node 0, not the default route's).
Every listener of ours binds to that address, and gloo and NCCL are pointed at the interface
that holds it, unless the user chose one.
"""

from __future__ import annotations

import os
import socket

from strata.distributed.sockets import HOST_IP_ENV, local_ipv4_addresses

# Names of the variables set by set_socket_ifname_for, not by the user: each node derives its own, so
# they are never forwarded to other nodes. Kept in the environment too
# (STRATA_DERIVED_ENV), so a child process that inherits them (an in-process driver's, a test's)
# recomputes them for its own node instead of taking them for the user's choice.
DERIVED_ENV_LIST = "STRATA_DERIVED_ENV"
DERIVED_ENV: set[str] = {v for v in os.environ.get(DERIVED_ENV_LIST, "").split(",") if v}


def node_ip(toward: str | None = None) -> str:
    """This node's private address (see the module docstring)."""
    if os.environ.get(HOST_IP_ENV):
        return os.environ[HOST_IP_ENV]
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return route_source(toward or "10.255.255.255")


def route_source(destination: str) -> str:
    """The local address the kernel would send from to reach `destination` (nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((destination, 1))
            return s.getsockname()[0]
        except OSError:  # no route (an isolated host): loopback is all there is
            return "127.0.0.1"


def interface_for_address(address: str) -> str | None:
    """The network interface that holds `address`, or None."""
    return local_ipv4_addresses().get(address)


def set_socket_ifname_for(address: str) -> str | None:
    """Points gloo and NCCL at the interface holding `address`, unless the user chose one.
    Returns the interface gloo will use.

    Without this they may pick 127.0.0.1 and ranks on other hosts never connect."""
    ifname = interface_for_address(address)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if var in os.environ and var not in DERIVED_ENV:
            continue  # the user's choice
        if ifname is None:
            os.environ.pop(var, None)
            DERIVED_ENV.discard(var)
        else:
            os.environ[var] = ifname
            DERIVED_ENV.add(var)
    os.environ[DERIVED_ENV_LIST] = ",".join(sorted(DERIVED_ENV))
    return os.environ.get("GLOO_SOCKET_IFNAME", ifname)
