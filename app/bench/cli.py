"""`strata bench latency | throughput | serve`: the parser tree, and how failures end a command.

A bad flag value is an argparse error (exit 2, naming the flag); a flag `strata serve` would
refuse is the same error in serve's words; a benchmark that cannot run as asked (no server
there, a model that does not load, a prompt longer than the context) prints one line and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from strata.app.bench import latency, serve, throughput
from strata.app.bench.flags import BenchError


def _run(args: argparse.Namespace) -> int:
    from strata.app.serve_cli import FlagError

    try:
        return args.bench_func(args)
    except FlagError as err:
        print(f"strata bench {args.bench_command}: error: {err}", file=sys.stderr)
        return 2
    except (BenchError, ValueError) as err:
        print(f"strata bench {args.bench_command}: error: {err}", file=sys.stderr)
        return 1


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    bench = subparsers.add_parser(
        "bench", help="benchmark the engine offline (latency, throughput) or a running server (serve)",
        description="Benchmarks with `vllm bench`'s flags and output: latency and throughput start an "
                    "engine in this process, serve loads a running `strata serve`.")
    sub = bench.add_subparsers(dest="bench_command", required=True, metavar="{latency,throughput,serve}")
    for command in (latency, throughput, serve):
        command.add_parser(sub).set_defaults(func=_run)
    return bench
