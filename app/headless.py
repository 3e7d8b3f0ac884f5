"""A headless node of the mp backend across nodes: `strata serve ... --node-rank K --headless`.

It hosts no driver and serves no API. It joins node 0 (actors/nodes/rendezvous.py), starts this node's
ranks as local processes (node K of N runs ranks K*W/N .. (K+1)*W/N - 1, device index = the
rank's place on the node), and watches. It exits 0 when the head shut down cleanly (its ranks
got the shutdown plan), and 1 with a message when the head went away or a rank died: a node
never hangs on a head that is gone.

Each node's own environment reaches its ranks (NCCL_*, GLOO_*, STRATA_HOST_IP, ...): unlike
Ray, nothing is forwarded from node 0, so set them on every node.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time

import torch

from strata.actors.executor import MpRankLauncher
from strata.actors.nodes.node_messages import RendezvousError
from strata.actors.nodes.rendezvous import HeadConnection, hello_for, join_head
from strata.config import EngineConfig
from strata.distributed.rank_layout import ranks_of_node
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")

_RANKS_STOP_S = 30.0  # after the head's Bye, how long this node's ranks may take to finish


def run_headless(config: EngineConfig, facts: ModelFacts) -> int:
    node = config.node_rank
    try:
        head = join_head(hello_for(config, "serve"), config.master_addr, config.master_port,
                         config.dist_init_timeout_s)
    except RendezvousError as err:
        print(f"strata serve: error: {err}", file=sys.stderr)
        return 1
    ranks = ranks_of_node(config.world_size, config.nnodes, node)
    launcher = MpRankLauncher(config.model_dump_json(), facts.to_json(), ranks, torch.cuda.device_count())
    launcher.start(config.master_addr, head.welcome.dist_port)
    logger.info("node %d (headless): ranks %d-%d started; node 0 at %s serves the API", node, ranks.start,
                ranks.stop - 1, head.where)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _watch(node, head, launcher)
    except KeyboardInterrupt:
        logger.info("node %d: interrupted; stopping this node's ranks", node)
        _stop(launcher, 0.0)
        return 0


def _watch(node: int, head: HeadConnection, launcher: MpRankLauncher) -> int:
    verdict: list[tuple[bool, str]] = []
    threading.Thread(target=lambda: verdict.append(head.watch()), name="strata-head-watch", daemon=True).start()
    while True:
        codes = {p.name: p.exitcode for p in launcher.procs}
        failed = {name: code for name, code in codes.items() if code not in (None, 0)}
        if failed:
            _stop(launcher, 0.0)
            print(f"strata serve: error: node {node}: rank process(es) died: "
                  f"{', '.join(f'{n} (exit {c})' for n, c in failed.items())}", file=sys.stderr)
            return 1
        if all(code == 0 for code in codes.values()):
            logger.info("node %d: every rank of this node finished (the head shut down)", node)
            return 0
        if verdict:
            clean, why = verdict[0]
            if clean:
                logger.info("node %d: %s; waiting for this node's ranks to finish", node, why)
                return 0 if _stop(launcher, _RANKS_STOP_S) else 1
            _stop(launcher, 0.0)
            print(f"strata serve: error: node {node}: {why}; stopped this node's ranks", file=sys.stderr)
            return 1
        time.sleep(0.2)


def _stop(launcher: MpRankLauncher, grace_s: float) -> bool:
    """Waits up to `grace_s` for the ranks, then terminates what is left. True if all ended cleanly."""
    deadline = time.monotonic() + grace_s
    for p in launcher.procs:
        p.join(max(deadline - time.monotonic(), 0))
    clean = all(p.exitcode == 0 for p in launcher.procs)
    for p in launcher.procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
    return clean


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt
