"""`strata doctor` on a running Ray cluster: an agent actor pinned to every live node reports
the node's facts, then agents measure every node pair's all-reduce, in rounds of disjoint pairs.

Everything waits a bounded time: a node whose agent does not answer within `timeout_s` (its
raylet hung, its GPUs all taken) is named and left out of the link checks; a pair that does not
finish within `timeout_s` is named and its agents replaced. Nodes Ray already lost are named too.
"""

from __future__ import annotations

import logging
import os

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from strata.actors.executor import rank_env
from strata.actors.nodes.doctor_report import DoctorReport, NodeReport, PairReport
from strata.actors.nodes.link_check import LinkResult, PairEndpoint, pair_rounds
from strata.actors.nodes.node_address import node_ip
from strata.actors.nodes.node_facts import NodeFacts, this_node

logger = logging.getLogger("strata")


class NodeAgent(PairEndpoint):
    """Runs on one node (a Ray actor): its facts, and its end of the pair measurements."""

    def __init__(self):
        super().__init__(node_ip())

    def facts(self) -> dict:
        return this_node().model_dump()


def _start_agent(node: dict):
    gpus = int(node["Resources"].get("GPU", 0))
    # No CPU asked (a busy cluster still answers); one GPU where there are GPUs, for NCCL.
    return ray.remote(NodeAgent).options(
        num_cpus=0, num_gpus=1 if gpus else 0, max_restarts=0, runtime_env={"env_vars": rank_env()},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
    ).remote()


def check_ray_cluster(address: str | None, timeout_s: float, nbytes: int | None, iters: int) -> DoctorReport:
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as err:
        raise ConnectionError(f"no Ray cluster at {address} ({err}); start one with `ray start` (see "
                              f"cluster/run_cluster.sh), or pass --address, or use the mp flags") from None
    try:
        where = f"Ray cluster at {ray.get_runtime_context().gcs_address}"
        nodes = sorted(ray.nodes(), key=lambda n: (not n["Resources"].get("node:__internal_head__"),
                                                   n["NodeManagerAddress"]))
        alive = [n for n in nodes if n["Alive"]]
        alive_ips = {n["NodeManagerAddress"] for n in alive}
        reports, agents = _node_facts(alive, timeout_s)
        lost = {n["NodeManagerAddress"]: n for n in nodes
                if not n["Alive"] and n["NodeManagerAddress"] not in alive_ips}
        for ip, n in lost.items():
            reason = n.get("DeathReasonMessage") or "no reason given"
            reports.append(NodeReport(ip, None, f"not answering: Ray lost this node ({reason})"))
        answered = [n for n in alive if n["NodeManagerAddress"] in agents]
        pairs = _measure_pairs(answered, agents, timeout_s, nbytes, iters)
        return DoctorReport(where, reports, pairs).judge(this_node())
    finally:
        ray.shutdown()


def _node_facts(alive: list[dict], timeout_s: float) -> tuple[list[NodeReport], dict]:
    """Every live node's facts; returns the reports and the agents of the nodes that answered."""
    agents = {n["NodeManagerAddress"]: _start_agent(n) for n in alive}
    refs = {ip: agent.facts.remote() for ip, agent in agents.items()}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    reports = []
    for n in alive:
        ip = n["NodeManagerAddress"]
        if refs[ip] not in ready:
            reports.append(NodeReport(ip, None, f"not answering: its agent did not report within {timeout_s:g} s"))
        else:
            try:
                facts = NodeFacts.model_validate(ray.get(refs[ip]))
            except RayError as err:
                reports.append(NodeReport(ip, None, f"not answering: its agent failed ({err})"))
            else:
                gpus = int(n["Resources"].get("GPU", 0))  # the agent sees only the one GPU it holds
                facts.gpus = (facts.gpus[:1] or ["GPU"]) * gpus
                reports.append(NodeReport(ip, facts))
                continue
        ray.kill(agents.pop(ip), no_restart=True)
    return reports, agents


def _measure_pairs(nodes: list[dict], agents: dict, timeout_s: float, nbytes: int | None,
                   iters: int) -> list[PairReport]:
    gpu = any(n["Resources"].get("GPU", 0) for n in nodes)
    size = nbytes or (64 << 20 if gpu else 4 << 20)
    ips = [n["NodeManagerAddress"] for n in nodes]
    by_ip = {n["NodeManagerAddress"]: n for n in nodes}
    reports = []
    for round_pairs in pair_rounds(len(ips)):
        pairs = [(ips[i], ips[j]) for i, j in round_pairs]
        try:
            ports = ray.get([agents[a].open_port.remote() for a, _ in pairs], timeout=timeout_s)
        except (RayError, TimeoutError) as err:
            reports += [PairReport(a, b, None, f"could not open a port: {err}") for a, b in pairs]
            continue
        refs = [(agents[a].measure.remote(a, port, 0, size, iters, timeout_s),
                 agents[b].measure.remote(a, port, 1, size, iters, timeout_s)) for (a, b), port in zip(pairs, ports,
                                                                                                    strict=True)]
        flat = [r for pair in refs for r in pair]
        ready, _ = ray.wait(flat, num_returns=len(flat), timeout=timeout_s + 5)
        for (a, b), (ref_a, ref_b) in zip(pairs, refs, strict=True):
            if ref_a not in ready or ref_b not in ready:
                reports.append(PairReport(a, b, None, f"the all-reduce did not finish within {timeout_s:g} s"))
                for ip in (a, b):  # a hung agent would hang every later pair: start a fresh one
                    ray.kill(agents[ip], no_restart=True)
                    agents[ip] = _start_agent(by_ip[ip])
                continue
            try:
                result = LinkResult.model_validate(ray.get(ref_a))
                ray.get(ref_b)
            except RayError as err:
                reports.append(PairReport(a, b, None, f"the all-reduce failed: {err}"))
            else:
                reports.append(PairReport(a, b, result))
    return reports
