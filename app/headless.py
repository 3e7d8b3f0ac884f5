"""A headless node of the mp backend across nodes: `strata serve ... --node-rank K --headless`.

It hosts no driver and serves no API. It joins node 0 (actors/nodes/rendezvous.py), then runs
this node's ranks as local processes on node 0's orders (node K of N runs ranks K*W/N ..
(K+1)*W/N - 1, device index = the rank's place on the node): StartRanks starts a gang's (a
rebuilt gang's after a fault), StopRanks kills them. A rank that dies is reported to node 0
(RanksDied), which rebuilds the gang; the node stays. It pings node 0 every few seconds, so a
hung node is noticed there.

It exits 0 when the head shut down cleanly (a Bye, or its ranks got the shutdown plan). A head
lost without a Bye (node 0 dropped this node as silent after a hang, the link broke, or the head
died) is rejoined: the node kills its stale ranks, says the same hello again for up to
dist_init_timeout_s, and serves the rebuilt gang's orders; node 0 takes it back as it takes a
node started again (actors/nodes/head_nodes.py). Only a head that cannot be reached within that
time ends it: 1, with a message. A node never hangs on a head that is gone.

Each node's own environment reaches its ranks (NCCL_*, GLOO_*, STRATA_HOST_IP, ...): unlike
Ray, nothing is forwarded from node 0, so set them on every node.
"""

from __future__ import annotations

import itertools
import logging
import queue
import signal
import sys
import threading
import time

import torch

from strata.actors.executor import MpRankLauncher
from strata.actors.nodes.node_messages import Hello, Ping, RanksDied, RendezvousError, StartRanks, StopRanks
from strata.actors.nodes.rendezvous import PING_INTERVAL_S, HeadConnection, hello_for, join_head
from strata.config import EngineConfig
from strata.distributed.rank_layout import ranks_of_node
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")

_RANKS_STOP_S = 30.0  # after the head's Bye, how long this node's ranks may take to finish
_REJOIN_PAUSE_S = 1.0  # between two tries at rejoining that were answered (refused, or closed)


def run_headless(config: EngineConfig, facts: ModelFacts) -> int:
    hello = hello_for(config, "serve")
    try:
        head = join_head(hello, config.master_addr, config.master_port, config.dist_init_timeout_s)
    except RendezvousError as err:
        print(f"strata serve: error: {err}", file=sys.stderr)
        return 1
    ranks = NodeRanks(config, facts)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return follow_head(config, hello, head, ranks)
    except KeyboardInterrupt:
        logger.info("node %d: interrupted; stopping this node's ranks", config.node_rank)
        ranks.stop(0.0)
        return 0


def follow_head(config: EngineConfig, hello: Hello, head: HeadConnection, ranks: NodeRanks) -> int:
    """Serves the head's orders until it shuts down (0; 1 if this node's ranks did not end
    cleanly). A head lost without a Bye is rejoined with `hello`; one that cannot be reached
    within dist_init_timeout_s ends it (1, saying why on stderr)."""
    node = config.node_rank
    while (verdict := _serve(node, head, ranks)) is not None:
        clean, why = verdict
        if clean:
            logger.info("node %d: %s; waiting for this node's ranks to finish", node, why)
            return 0 if ranks.stop(_RANKS_STOP_S) else 1
        head.close()
        ranks.kill()  # stale: node 0 rebuilds the gang, and its old ranks must not meet the new ones
        logger.warning("node %d: lost the head (%s); stopped this node's ranks; rejoining for up to %.0f s", node,
                       why, config.dist_init_timeout_s)
        try:
            head = _rejoin(config, hello)
        except RendezvousError as err:
            print(f"strata serve: error: node {node}: {why}; stopped this node's ranks; {err}", file=sys.stderr)
            return 1
    logger.info("node %d: every rank of this node finished (the head shut down)", node)
    return 0


class NodeRanks:
    """This node's ranks of the gang node 0 ordered last (none before the first order)."""

    def __init__(self, config: EngineConfig, facts: ModelFacts):
        self.config, self.facts_json = config, facts.to_json()
        self.range = ranks_of_node(config.world_size, config.nnodes, config.node_rank)
        self.launcher: MpRankLauncher | None = None
        self.gang = -1
        self.reported = False  # their death was told to node 0 (once per gang)

    def start(self, order: StartRanks) -> None:
        self.kill()  # an earlier gang's, if node 0 did not say so first
        config = self.config
        if order.num_kv_blocks is not None:
            config = config.model_copy(update={"num_kv_blocks_override": order.num_kv_blocks})
        self.launcher = MpRankLauncher(config.model_dump_json(), self.facts_json, self.range,
                                       torch.cuda.device_count())
        self.launcher.start(config.master_addr, order.dist_port)
        self.gang, self.reported = order.gang, False
        logger.info("node %d (headless): ranks %d-%d started (gang %d)", config.node_rank, self.range.start,
                    self.range.stop - 1, order.gang)

    def kill(self) -> None:
        if self.launcher is not None:
            self.launcher.kill()
            self.launcher = None

    def death(self) -> RanksDied | None:
        """What to tell node 0 when one of them died (not on their clean exit, after the shutdown
        plan); the others are killed then, so none waits on its lost peer."""
        procs = self.launcher.procs if self.launcher is not None else []
        if self.reported or not any(p.exitcode not in (None, 0) for p in procs):
            return None
        fault = self.launcher.dead_rank()
        self.kill()
        self.reported = True
        return RanksDied(gang=self.gang, reason=f"node {self.config.node_rank}: {fault.reason}", rank=fault.rank,
                         died=fault.died)

    def finished(self) -> bool:
        """Every rank ended cleanly: the head's shutdown plan reached them."""
        procs = self.launcher.procs if self.launcher is not None else []
        return bool(procs) and all(p.exitcode == 0 for p in procs)

    def stop(self, grace_s: float) -> bool:
        """Waits up to `grace_s` for the ranks, then terminates what is left. True if all ended cleanly."""
        procs = self.launcher.procs if self.launcher is not None else []
        deadline = time.monotonic() + grace_s
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
        clean = all(p.exitcode == 0 for p in procs)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
                if p.is_alive():
                    p.kill()
        return clean


def _serve(node: int, head: HeadConnection, ranks: NodeRanks) -> tuple[bool, str] | None:
    """Carries out one connection's orders until it ends: the head's verdict (clean, why), or
    None when every rank of this node finished (the shutdown plan reached them)."""
    orders: queue.SimpleQueue = queue.SimpleQueue()  # this connection's only: a lost one's are stale
    verdict: list[tuple[bool, str]] = []
    threading.Thread(target=lambda: verdict.append(head.watch(orders.put)), name="strata-head-watch",
                     daemon=True).start()
    next_ping = 0.0
    while True:
        while not orders.empty():
            order = orders.get()
            if isinstance(order, StartRanks):
                ranks.start(order)
            elif isinstance(order, StopRanks) and order.gang == ranks.gang:
                logger.info("node %d: node 0 stops gang %d's ranks (it is being rebuilt)", node, order.gang)
                ranks.kill()
        died = ranks.death()
        try:
            if died is not None:
                logger.error("%s; told node 0, which rebuilds the gang", died.reason)
                head.send(died)
            if time.monotonic() >= next_ping:
                head.send(Ping())
                next_ping = time.monotonic() + PING_INTERVAL_S
        except OSError:
            pass  # the head is gone: the watch thread says so in a moment
        if ranks.finished():
            return None
        if verdict:
            return verdict[0]
        time.sleep(0.2)


def _rejoin(config: EngineConfig, hello: Hello) -> HeadConnection:
    """join_head again with the same hello, until dist_init_timeout_s has passed: each try's
    outcome is logged; the last one's error is raised."""
    node, timeout_s = config.node_rank, config.dist_init_timeout_s
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count(1):
        try:
            head = join_head(hello, config.master_addr, config.master_port, max(deadline - time.monotonic(), 0.1))
        except RendezvousError as err:
            if time.monotonic() + _REJOIN_PAUSE_S >= deadline:
                raise
            logger.warning("node %d: rejoining, try %d: %s; trying again", node, attempt, err)
            time.sleep(_REJOIN_PAUSE_S)
            continue
        logger.warning("node %d: rejoined the head at %s (try %d); waiting for node 0's orders", node, head.where,
                       attempt)
        return head


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt
