"""`strata doctor` for the mp backend: the same node flags as `strata serve`, run on every node.

The nodes meet through the mp rendezvous (a node that does not come within the timeout is named),
then form one torch.distributed world of one process per node: gloo for control, and per pair
of nodes a group (NCCL on GPU) for the measured all-reduce, in rounds of disjoint pairs. Every
node gathers all results and prints the same report; collectives time out after `timeout_s`.
"""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

from strata.actors.nodes.doctor_report import DoctorReport, NodeReport, PairReport
from strata.actors.nodes.link_check import LinkResult, nccl_transport, pair_rounds, result_of, timed_all_reduce
from strata.actors.nodes.node_address import set_socket_ifname_for
from strata.actors.nodes.node_facts import NodeFacts, this_node
from strata.actors.nodes.node_messages import Hello, RendezvousError
from strata.actors.nodes.rendezvous import HeadRendezvous, join_head
from strata.distributed.channel import all_gather_msgpack
from strata.distributed.process_groups import rendezvous_store
from strata.distributed.sockets import bind_listener


def check_mp_nodes(nnodes: int, node_rank: int, master_addr: str, master_port: int, timeout_s: float,
                   nbytes: int | None, iters: int) -> DoctorReport:
    gpu = torch.cuda.is_available()
    nccl_log = None
    if gpu:  # NCCL reads these once, at its first use in this process
        nccl_log = os.path.join(tempfile.mkdtemp(prefix="strata-doctor-"), "nccl.log")
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET", NCCL_DEBUG_FILE=nccl_log)
    me = Hello(purpose="doctor", node_rank=node_rank, nnodes=nnodes, tp=1, pp=1, facts=this_node(master_addr))
    where = f"mp nodes meeting at {master_addr}:{master_port}"
    listener = None
    try:
        if node_rank == 0:
            listener = bind_listener(master_addr)
            nodes = HeadRendezvous(me, master_addr, master_port, timeout_s).wait_for_nodes(listener.getsockname()[1])
            port = 0
        else:
            head = join_head(me, master_addr, master_port, timeout_s)
            nodes, port = head.welcome.nodes, head.welcome.dist_port
    except RendezvousError as err:
        if listener is not None:
            listener.close()
        return _unmet(me, err, where)
    set_socket_ifname_for(me.facts.ip)
    store = rendezvous_store(node_rank, nnodes, master_addr, port, timeout_s, listener)
    dist.init_process_group("gloo", store=store, rank=node_rank, world_size=nnodes,
                            timeout=timedelta(seconds=timeout_s))
    try:
        mine = _my_pairs(node_rank, nnodes, gpu, nbytes, iters, nccl_log)
        everyone = all_gather_msgpack(mine, dist.group.WORLD, nnodes)
    finally:
        dist.destroy_process_group()
    names = [n.ip for n in nodes]
    pairs = [PairReport(names[a], names[b], LinkResult.model_validate(r) if r else None, problem)
             for results in everyone for a, b, r, problem in results]
    return DoctorReport(where, [NodeReport(n.ip, n) for n in nodes], pairs).judge(me.facts)


def _my_pairs(rank: int, nnodes: int, gpu: bool, nbytes: int | None, iters: int,
              nccl_log: str | None) -> list[tuple[int, int, dict | None, str | None]]:
    """Measures the pairs this node leads (as their lower rank) and takes part in the others."""
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    size = nbytes or (64 << 20 if gpu else 4 << 20)
    rounds = pair_rounds(nnodes)
    # new_group is collective: every node creates every pair's group, in the same order.
    groups = {p: dist.new_group(list(p), backend="nccl" if gpu else "gloo") for r in rounds for p in r}
    results = []
    for round_pairs in rounds:
        for a, b in round_pairs:
            if rank not in (a, b):
                continue
            offset = os.path.getsize(nccl_log) if nccl_log and os.path.exists(nccl_log) else 0
            try:
                seconds = timed_all_reduce(groups[(a, b)], device, size, iters)
            except RuntimeError as err:  # a peer died or timed out: say so, go on with the rest
                results.append((a, b, None, f"the all-reduce failed: {err}"))
                continue
            transport = "gloo TCP"
            if nccl_log:
                with open(nccl_log, errors="replace") as f:
                    f.seek(offset)
                    transport = nccl_transport(f.read())
            if rank == a:
                results.append((a, b, result_of(transport, size, seconds).model_dump(), None))
    return results


def _unmet(me: Hello, err: RendezvousError, where: str) -> DoctorReport:
    """The nodes did not all meet: node 0 lists who came and who did not; another node, why."""
    if me.node_rank != 0:
        return DoctorReport(where, [NodeReport(me.facts.ip, me.facts)], errors=[str(err)])
    reports = [NodeReport(f.ip, NodeFacts.model_validate(f)) for _, f in sorted(err.joined.items())]
    reports += [NodeReport(f"node {k}", None, "not answering: did not join within the timeout") for k in err.missing]
    return DoctorReport(where, reports).judge(me.facts)
