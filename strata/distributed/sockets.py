"""Listening sockets bound to one address, and the node's IPv4 addresses for their error messages.

Every listener of ours (torch.distributed's store, the mp rendezvous, the doctor's link check)
binds to the node's private address, never all interfaces. Which address that is, is
actors/nodes/node_address.py's business; this floor only binds, and says what it could have used.
"""

from __future__ import annotations

import socket
import subprocess

# The user's choice of this node's private address (as vLLM's VLLM_HOST_IP).
HOST_IP_ENV = "STRATA_HOST_IP"


def local_ipv4_addresses() -> dict[str, str]:
    """address -> interface, read from `ip -o -4 addr` (Linux); empty when `ip` is missing."""
    try:
        out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        # "2: eth0    inet 10.0.0.2/24 brd ..."
        if len(parts) >= 4 and parts[2] == "inet":
            found[parts[3].split("/")[0]] = parts[1]
    return found


def bind_listener(host: str, port: int = 0, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on `host` only (never all interfaces); port 0 picks a free one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait out TIME_WAIT
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        here = ", ".join(sorted(local_ipv4_addresses())) or "unknown"
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror} (this node's addresses: {here}; "
                      f"set {HOST_IP_ENV} to the private one)") from None
    sock.listen(backlog)
    return sock
