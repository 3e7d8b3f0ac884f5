"""The engine flags of `strata bench latency | throughput`: `strata serve`'s own.

The flags (names, defaults, checks) are defined once, in app/serve_cli.py (`add_engine_args`), and
turned into an EngineConfig there (`engine_config_from_args`), so a flag added to `strata serve`
reaches the benchmarks with its meaning and validation. The server and multi-node flags stay
behind: an offline benchmark has no HTTP side and runs from one node.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from strata.app.serve_cli import FlagError, add_engine_args, describe_flags, engine_config_from_args
from strata.config import EngineConfig

__all__ = ["add_engine_args", "engine_config", "start_llm"]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig `strata serve` would build from the same flags; raises serve_cli's
    FlagError (naming the flag) for a value it refuses."""
    backend = args.distributed_executor_backend
    if backend == "auto":
        backend = "ray"  # as serve: Strata is a Ray application (mp when asked by name)
    for flag, dest in (("--address", "address"), ("--driver-node", "driver_node")):
        if getattr(args, dest) and backend != "ray":
            raise FlagError(f"{flag} names a Ray cluster or node; it needs --distributed-executor-backend ray")
    try:
        return engine_config_from_args(args, backend)
    except ValidationError as err:
        raise FlagError(describe_flags(err)) from None


def start_llm(args: argparse.Namespace):
    """An offline `LLM` on the engine the flags describe."""
    from strata import LLM

    return LLM(**engine_config(args).model_dump())
