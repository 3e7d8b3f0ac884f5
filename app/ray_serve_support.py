"""What the HTTP server's launchers need from the runtime's lower layers, in one app-level place.

app/server/ depends only on the `Engine` protocol (strata/engine_protocol.py): nothing there
imports strata.actors or strata.placement. The Ray Serve deployment and `strata serve` still
need a few facts about placement and the ranks' environment, and one error type of the mp
rendezvous; they reach them through this module. Imports stay inside the functions, so importing
it starts nothing and loads neither Ray nor torch.
"""

from __future__ import annotations

from strata.config import EngineConfig


def driver_pin(config: EngineConfig) -> dict[str, float]:
    """Resources that place an actor (the Serve ingress) on the driver node."""
    from strata.placement.placement import driver_pin as pin

    return pin(config)


def check_driver_node(config: EngineConfig) -> None:
    """Fails (PlacementError) unless `config.driver_node` is a live node that can hold stage 0."""
    from strata.placement.placement import check_driver_node as check

    check(config)


def rank_env() -> dict[str, str]:
    """The environment a rank gets (STRATA_/HF_/NCCL_ settings); the ingress gets the same."""
    from strata.actors.executor import rank_env as env

    return env()


def ensure_ray(config: EngineConfig) -> None:
    """Joins the Ray cluster the user named (or the one recorded on this machine, if it answers),
    else starts a private local one: see strata.app.ray_cluster.ensure_ray."""
    from strata.app.ray_cluster import ensure_ray as ensure

    ensure(config)


def engine_start_errors() -> tuple[type[BaseException], ...]:
    """Errors starting the mp engine that `strata serve` reports in one line (another node is
    missing or unreachable), rather than as a traceback."""
    from strata.actors.nodes.node_messages import RendezvousError

    return (RendezvousError, OSError)
