"""Starting, watching and killing the non-driver ranks: on Ray or as local processes.

`RayRankLauncher` puts ranks 1..N-1 into their placement bundles as Ray actors; `MpRankLauncher`
starts them as processes on this node. Either way every rank runs the same
`RankWorker.bring_up`, and all but rank 0 enter `run_loop`. While serving, `dead_rank` says
whether one is gone (a run loop that ended: a killed actor or process) and `kill` ends them all
at once, a hung one too; `stop` is the orderly end, after the shutdown plan.

The Ray launcher lives in the driver, an async actor, and never calls `ray.get`: it watches its
calls to the ranks as concurrent futures (`ObjectRef.future()`, completed by Ray's core worker),
which the threads that start and watch the gang (the driver's start-up, its engine thread, its
watchdog) wait on without touching the actor's event loop. A blocking `ray.get` there is what Ray
warns about ("Using blocking ray.get inside async actor"): it would stall every request stream
the loop serves.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import os
import signal
from concurrent import futures

import torch

from strata.actors.engine.engine_health import Fault
from strata.actors.nodes.node_address import DERIVED_ENV, DERIVED_ENV_LIST
from strata.actors.worker.rank import RankWorker
from strata.config import EngineConfig
from strata.distributed.rank_layout import ranks_of_node
from strata.distributed.sockets import HOST_IP_ENV

logger = logging.getLogger("strata")

# How long a raise waits for a death to name instead (see RayRankLauncher.dead_rank).
DEATH_GRACE_S = 1.0
# Variables every rank inherits from the driver's environment (besides any the user lists in
# STRATA_FORWARD_ENV, comma-separated), so NCCL and gloo settings reach remote nodes.
_FORWARD_PREFIXES = ("NCCL_", "GLOO_", "TORCH_", "CUDA_LAUNCH_BLOCKING", "STRATA_", "HF_", "OMP_")


def rank_env() -> dict[str, str]:
    """Environment for a rank process. This node's address, and the interfaces we derived from
    it, are not forwarded: every node finds its own (the user's own choices are forwarded)."""
    extra = {v.strip() for v in os.environ.get("STRATA_FORWARD_ENV", "").split(",") if v.strip()}
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARD_PREFIXES) or k in extra}
    for key in (*DERIVED_ENV, DERIVED_ENV_LIST, HOST_IP_ENV):
        env.pop(key, None)
    # Multicast over NVLink has hung on the machines we test on; keep it off unless asked.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    return env


class RayRankLauncher:
    """Ranks 1..N-1 as Ray actors, one per placement bundle."""

    def __init__(self, config_json: str, facts_json: str, world_size: int, placement):
        import ray

        self.placement = placement
        actor_cls = ray.remote(RankWorker)
        self.actors = []
        for rank in range(1, world_size):
            opts = dict(placement.actor_resources(), scheduling_strategy=placement.strategy_for_rank(rank),
                        runtime_env={"env_vars": rank_env()}, name=None, max_concurrency=2)
            self.actors.append(actor_cls.options(**opts).remote(config_json, facts_json, rank, 0))
        self._loops = []

    def start(self, master_addr: str, master_port: int) -> list[futures.Future]:
        """Begins bring-up on every remote rank; returns its futures (rank r's at r - 1) to wait on."""
        return _futures(a.bring_up.remote(master_addr, master_port) for a in self.actors)

    def failure(self, handle: list[futures.Future]) -> str | None:
        """The error of a rank whose bring-up already failed, if any (does not wait)."""
        for rank, call in enumerate(handle, start=1):
            if call.done() and call.exception() is not None:
                return f"rank {rank}: {_cause(call.exception())}"
        return None

    def wait_started(self, handle: list[futures.Future]) -> None:
        """Waits for every rank's bring-up to return (rank 0's has: they all met it in the
        rendezvous, so this is the last moment of theirs), raising the first error; then starts
        their run loops."""
        for call in handle:
            call.result()
        self._loops = _futures(a.run_loop.remote() for a in self.actors)

    async def step_times(self) -> list[list[tuple[float, float]]]:
        """Awaited, not ray.get: the driver is an async actor, and a blocking get would stall
        every request stream it serves while the ranks answer."""
        return list(await asyncio.gather(*(a.step_times.remote() for a in self.actors)))

    def dead_rank(self) -> Fault | None:
        """A rank whose run loop ended while serving: its actor died, or the loop raised. A death
        is named before a raise: a rank whose peer died raises a moment later (its collective
        broke), so when only raises are seen, the other loops get DEATH_GRACE_S to show a death."""
        ended, running = [], []
        for rank, call in enumerate(self._loops, start=1):  # read once: `kill`, on another thread, replaces it
            (ended if call.done() else running).append((rank, call))
        if not ended:
            return None
        faults = [_loop_fault(rank, call) for rank, call in ended]
        if not any(died for _, died in faults) and running:
            futures.wait([call for _, call in running], timeout=DEATH_GRACE_S)
            faults += [_loop_fault(rank, call) for rank, call in running if call.done()]
        return next((f for f, died in faults if died), faults[0][0])

    def stopped_rank(self) -> int | None:
        return None  # Ray does not tell a stopped actor from a busy one

    def kill(self) -> None:
        """Kills every rank actor now (a hung one does not answer a shutdown)."""
        import ray

        actors, self.actors, self._loops = self.actors, [], []
        for a in actors:
            ray.kill(a, no_restart=True)

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        if self._loops:
            futures.wait(self._loops, timeout=timeout_s)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _futures(refs) -> list[futures.Future]:
    """Ray calls as concurrent futures: any thread may wait on one, none calls ray.get. A failed
    call's future holds what ray.get would raise (the actor's exception, or RayActorError)."""
    return [ref.future() for ref in refs]


def _cause(err: BaseException) -> BaseException:
    """The rank's own exception, without Ray's wrapping (RayTaskError)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _loop_fault(rank: int, call: futures.Future) -> tuple[Fault, bool]:
    """(the fault a finished run loop tells, whether its actor died)."""
    import ray

    err = call.exception()
    if err is None:
        return Fault(f"rank {rank}'s run loop returned", rank), False
    if isinstance(err, ray.exceptions.RayActorError):
        return Fault(f"rank {rank}'s actor is gone ({_first_line(err)})", rank, died=True), True
    return Fault(f"rank {rank}'s run loop raised ({_first_line(_cause(err))})", rank), False


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def _mp_rank_main(config_json: str, facts_json: str, rank: int, device_index: int,
                  master_addr: str, master_port: int, env: dict[str, str]) -> None:
    os.environ.update(env)
    # Ctrl-C reaches the whole process group; the driver stops its ranks itself, in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    worker = RankWorker(config_json, facts_json, rank, device_index)
    worker.bring_up(master_addr, master_port)
    worker.run_loop()
    worker.shutdown()


class MpRankLauncher:
    """This node's ranks as local processes (the multiprocessing backend).

    `node_ranks` are the global ranks this node runs (see `ranks_of_node`); the device index of
    each is its place in that range. On node 0, rank 0 is the driver itself and is skipped here."""

    def __init__(self, config_json: str, facts_json: str, node_ranks: range, gpus_on_node: int):
        self.args = (config_json, facts_json)
        self.node_ranks = node_ranks
        self.gpus = gpus_on_node
        self.procs: list[mp.Process] = []

    def start(self, master_addr: str, master_port: int):
        ctx = mp.get_context("spawn")  # fork would copy the driver's threads and CUDA state
        for rank in self.node_ranks:
            if rank == 0:
                continue
            local = rank - self.node_ranks.start
            device = local % self.gpus if self.gpus else 0
            p = ctx.Process(target=_mp_rank_main, daemon=True, name=f"rank-{rank}",
                            args=(*self.args, rank, device, master_addr, master_port, rank_env()))
            p.start()
            self.procs.append(p)
        return None

    def failure(self, handle) -> str | None:
        for p in self.procs:
            if p.exitcode not in (None, 0):
                return f"{p.name} exited with code {p.exitcode} (its error is in this node's log above)"
        return None

    def wait_started(self, handle) -> None:
        return None  # bring_up's collectives already synchronised every rank with the driver

    def dead_rank(self) -> Fault | None:
        """A rank process that exited while serving (any exit: a rank leaves only on shutdown). One
        killed by a signal is named before one that exited: that one may only have lost its peer."""
        gone = sorted((p for p in self.procs if p.exitcode is not None), key=lambda p: p.exitcode >= 0)
        if not gone:
            return None
        p = gone[0]
        rank = int(p.name.removeprefix("rank-"))
        how = f"was killed by signal {-p.exitcode}" if p.exitcode < 0 else f"exited with code {p.exitcode}"
        return Fault(f"rank {rank} (pid {p.pid}) {how}", rank, died=p.exitcode < 0)

    def stopped_rank(self) -> int | None:
        """A rank process that is stopped (state T in /proc: SIGSTOP, a debugger)."""
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state in ("T", "t"):
                return int(p.name.removeprefix("rank-"))
        return None

    def kill(self) -> None:
        """SIGKILLs every rank process now (a stopped or hung one too) and reaps it."""
        procs, self.procs = self.procs, []  # the watchdog and the engine thread may both call it
        for p in procs:
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.join(10)

    async def step_times(self) -> list[list[tuple[float, float]]]:
        return []

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout_s)
            if p.is_alive():
                p.terminate()
        self.procs = []


def rank_launcher(config: EngineConfig, config_json: str, facts_json: str,
                  placement) -> RayRankLauncher | MpRankLauncher:
    """The driver's launcher: Ray actors in the placement bundles, else this node's processes."""
    if placement is not None:
        return RayRankLauncher(config_json, facts_json, config.world_size, placement)
    node_ranks = ranks_of_node(config.world_size, config.nnodes, 0)
    return MpRankLauncher(config_json, facts_json, node_ranks, torch.cuda.device_count())
