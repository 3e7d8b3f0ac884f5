"""`strata doctor`: is this cluster ready to serve across nodes?

On a running Ray cluster (or, with the mp backend's node flags, run on every node) it reports
per node the GPUs, the strata / torch / ray / transformers versions (a mismatch with this
machine's is an error), the address and the interface our traffic uses; then a short all-reduce
between every pair of nodes, its bandwidth and the transport (NCCL's network on GPU, with a
warning when it fell back to sockets; gloo on CPU). Every wait is bounded by --timeout, and a
node that did not answer is named. Exit code 0 when all is well, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "doctor", help="check the nodes of a multi-node setup: versions, GPUs, addresses, links",
        description="Check every node of a Ray cluster (or of an mp setup, with the same node flags as "
                    "`strata serve`, run on every node): GPUs, versions, address and interface, and an "
                    "all-reduce between every node pair with its bandwidth and transport.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--address", default=None,
                   help="Ray cluster to check (default: $RAY_ADDRESS, else the one on this machine)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a node may take to answer, and each round of link checks to finish")
    p.add_argument("--size-mib", type=float, default=None,
                   help="all-reduce size per link check (default: 64 MiB on GPU, 4 MiB on CPU)")
    p.add_argument("--iters", type=int, default=5, help="timed all-reduces per link check")
    mn = p.add_argument_group("mp backend across nodes (run on every node)")
    mn.add_argument("--nnodes", type=int, default=None, help="number of nodes")
    mn.add_argument("--node-rank", type=int, default=0, help="this node's index, 0 .. nnodes-1")
    mn.add_argument("--master-addr", default=None, help="node 0's private address")
    mn.add_argument("--master-port", type=int, default=29500, help="node 0's rendezvous port")
    p.set_defaults(func=run_doctor)
    return p


def run_doctor(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from strata.actors.nodes.doctor_report import render

    nbytes = int(args.size_mib * 2**20) if args.size_mib else None
    try:
        if args.nnodes is not None and args.nnodes > 1:
            if not args.master_addr:
                print("strata doctor: error: --nnodes needs --master-addr (node 0's private address)", file=sys.stderr)
                return 2
            from strata.actors.nodes.doctor_mp import check_mp_nodes

            report = check_mp_nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port, args.timeout,
                                    nbytes, args.iters)
        else:
            from strata.actors.nodes.doctor_ray import check_ray_cluster

            report = check_ray_cluster(args.address, args.timeout, nbytes, args.iters)
    except (ConnectionError, OSError, RuntimeError) as err:
        print(f"strata doctor: error: {err}", file=sys.stderr)
        return 1
    print(render(report), flush=True)
    return 0 if report.ok else 1
