"""What a node is: its name, private address and interface, GPUs, and the versions it runs.

Nodes exchange these when they meet (the mp rendezvous, `strata doctor`): ranks of different
torch or Strata versions can deadlock or corrupt each other's tensors in ways that look like
anything but a version problem, so a mismatch is an error named up front.
"""

from __future__ import annotations

import platform
import socket
from importlib import metadata

from pydantic import BaseModel

from strata.actors.nodes.node_address import interface_for_address, node_ip

# Packages whose versions must agree on every node.
MUST_MATCH = ("strata", "torch", "ray", "transformers")


class NodeFacts(BaseModel):
    host: str
    ip: str
    interface: str | None
    gpus: list[str]  # device names; empty on a CPU node
    versions: dict[str, str]  # MUST_MATCH packages, and python


def package_versions() -> dict[str, str]:
    found = {}
    for name in MUST_MATCH:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    found["python"] = platform.python_version()
    return found


def gpu_names() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def this_node(toward: str | None = None) -> NodeFacts:
    """This node's facts; `toward` is the master's address when there is no Ray (see node_ip)."""
    ip = node_ip(toward)
    return NodeFacts(host=socket.gethostname(), ip=ip, interface=interface_for_address(ip), gpus=gpu_names(),
                     versions=package_versions())


def version_mismatches(reference: NodeFacts, other: NodeFacts) -> list[str]:
    """'torch 2.4.0 on 10.0.0.2 where 10.0.0.1 has 2.5.1', one per package that differs."""
    return [f"{name} {other.versions.get(name)} on {other.ip} where {reference.ip} has {reference.versions.get(name)}"
            for name in MUST_MATCH if other.versions.get(name) != reference.versions.get(name)]
