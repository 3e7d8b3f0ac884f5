"""`strata bench serve`: load a running OpenAI-compatible server, as `vllm bench serve` does.

It starts no server: it sends the dataset's requests to the one at `--base-url` (or
`--host`/`--port`), at `--request-rate` (a Poisson process, or all at once for inf) and at most
`--max-concurrency` in flight, then prints vLLM's "Serving Benchmark Result" block: throughput,
and the mean, median and chosen percentiles of TTFT, TPOT, ITL (and E2E latency on request).
Failed requests are counted and reported, not fatal (the exit status is 1 only when none
succeeded); an unreachable server fails at once, before any request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass

import numpy as np

from strata.app.bench.datasets import SampleRequest, add_dataset_args, requests_from_args
from strata.app.bench.flags import (
    BenchError,
    HelpFormatter,
    add_output_args,
    positive_float,
    positive_int,
    request_rate,
    write_json,
)
from strata.app.bench.serve_metrics import METRIC_TITLES, print_serving_result, serving_record
from strata.app.bench.serve_request import RequestResult, completion_payload, send_completion

METRICS = tuple(METRIC_TITLES)


@dataclass(frozen=True)
class Target:
    """Where the requests go, and as which model."""

    base_url: str
    endpoint: str
    model: str
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint


def arrival_offsets(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: all at 0 for an infinite rate, else
    gaps drawn from a gamma distribution of mean 1/rate (burstiness 1: a Poisson process), as vLLM."""
    if rate == float("inf"):
        return [0.0] * n
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    gaps[0] = 0.0  # the first request goes at once
    return np.cumsum(gaps).tolist()


async def run_requests(target: Target, requests: list[SampleRequest], offsets: list[float],
                       max_concurrency: int | None, ignore_eos: bool,
                       progress: bool = False) -> tuple[list[RequestResult], float]:
    """Every request's result, in order, and the benchmark's duration in seconds."""
    import httpx
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # No pool limit beyond the concurrency asked: waiting for a connection would count as TTFT.
    limits = httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency)
    timeout = httpx.Timeout(6 * 3600.0)  # a long benchmark's requests may queue for a long time
    with tqdm(total=len(requests), disable=not progress) as bar:
        async with httpx.AsyncClient(headers=target.headers, limits=limits, timeout=timeout) as client:

            async def one(request: SampleRequest) -> RequestResult:
                payload = completion_payload(target.model, request, ignore_eos)
                if limit is None:
                    result = await send_completion(client, target.url, payload, request.prompt_len)
                else:
                    async with limit:
                        result = await send_completion(client, target.url, payload, request.prompt_len)
                bar.update(1)
                return result

            started = time.perf_counter()
            tasks = []
            for request, offset in zip(requests, offsets, strict=True):
                delay = started + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(request)))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - started
    return list(results), duration


def resolve_target(args: argparse.Namespace) -> Target:
    """The server's URL and the model to ask for (`--model`, else the first of /v1/models),
    checked against the server before any request: a missing server fails here, clearly."""
    try:
        import httpx
    except ImportError:
        raise BenchError("strata bench serve needs httpx: pip install httpx") from None

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.get(base_url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as err:
        raise BenchError(f"no server answers at {base_url} ({type(err).__name__}: {err}); start one first "
                         f"(`strata serve MODEL`), or point --base-url or --host/--port at it") from None
    if response.status_code != 200:
        raise BenchError(f"GET {base_url}/v1/models answered {response.status_code}: {response.text[:300]}"
                         + (" (pass --api-key, or set OPENAI_API_KEY)" if response.status_code == 401 else ""))
    served = [m["id"] for m in response.json().get("data", [])]
    model = args.model or (served[0] if served else None)
    if model is None:
        raise BenchError(f"{base_url}/v1/models lists no model; pass --model")
    if served and model not in served:
        raise BenchError(f"{base_url} does not serve {model!r}; it serves {served}")
    return Target(base_url, args.endpoint, model, headers)


def vocab_size_of(model: str, tokenizer: str | None) -> int:
    """The vocabulary the random prompts draw from: config.json of --tokenizer, else of the served
    model (its name is its path or hub id unless --served-model-name renamed it)."""
    from transformers import AutoConfig

    from strata.app.bundled_model import BUNDLED_MODEL_NAME
    from strata.app.model_source import resolve_model_dir

    source = tokenizer or model
    try:
        config = AutoConfig.from_pretrained(resolve_model_dir(None if source == BUNDLED_MODEL_NAME else source))
        return int(config.vocab_size)
    except (ValueError, OSError, AttributeError) as err:
        raise BenchError(f"cannot tell the vocabulary size of {source!r} to draw prompt token ids from ({err}); "
                         f"pass --tokenizer MODEL_DIR (a directory or hub id with the model's config.json)") from None


def run(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    requests = requests_from_args(args, vocab_size_of(target.model, args.tokenizer))
    offsets = arrival_offsets(len(requests), args.request_rate, args.burstiness, args.seed)
    print(f"Traffic request rate: {args.request_rate}")
    kind = "Poisson process" if args.burstiness == 1 else "Gamma distribution"
    print(f"Burstiness factor: {args.burstiness} ({kind})")
    print(f"Maximum request concurrency: {args.max_concurrency}", flush=True)
    results, duration = asyncio.run(run_requests(target, requests, offsets, args.max_concurrency,
                                                 args.ignore_eos, progress=not args.disable_tqdm))
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    percentages = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    summary = print_serving_result(results, duration, args.max_concurrency, metrics, percentages)
    if args.output_json:
        record = serving_record(results, duration, percentages)
        record.update(model_id=target.model, base_url=target.base_url, endpoint=target.endpoint,
                      num_prompts=args.num_prompts, burstiness=args.burstiness,
                      request_rate="inf" if args.request_rate == float("inf") else args.request_rate,
                      max_concurrency=args.max_concurrency, seed=args.seed)
        write_json(args.output_json, record)
    return 0 if summary.completed else 1  # failures are reported; only a run with no success fails


def _endpoint(text: str) -> str:
    if not text.startswith("/") or not text.rstrip("/").endswith("/completions") or "chat" in text:
        raise argparse.ArgumentTypeError(f"must be the completions route, such as /v1/completions, got {text!r}")
    return text


def _metric_names(text: str) -> str:
    bad = [m for m in text.split(",") if m.strip() not in METRICS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown metric {bad[0]!r}; choose from {', '.join(METRICS)}")
    return text


def _percentage_list(text: str) -> str:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers such as 50,90,99, got {text!r}") from None
    if not all(0 < p <= 100 for p in values):
        raise argparse.ArgumentTypeError(f"percentiles must be in (0, 100], got {text!r}")
    return text


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="load a running server over the OpenAI API",
        description="Send a dataset's requests to a running OpenAI-compatible server (start it with "
                    "`strata serve`) and report TTFT, TPOT, ITL and throughput, as `vllm bench serve`.",
        formatter_class=HelpFormatter)
    srv = p.add_argument_group("server")
    srv.add_argument("--base-url", default=None, help="the server's URL, e.g. http://10.0.0.1:8000 (default: "
                                                      "http://HOST:PORT)")
    srv.add_argument("--host", default="127.0.0.1", help="the server's host, without --base-url")
    srv.add_argument("--port", type=positive_int, default=8000, help="the server's port, without --base-url")
    srv.add_argument("--endpoint", type=_endpoint, default="/v1/completions", help="the completions route")
    srv.add_argument("--model", default=None, help="the served model name to ask for (default: the first of "
                                                   "/v1/models)")
    srv.add_argument("--tokenizer", default=None,
                     help="model directory or hub id whose config.json gives the vocabulary the prompt ids are "
                          "drawn from (default: the served model's, when its name is its path or id)")
    srv.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                     help="sent as `Authorization: Bearer KEY` (default: $OPENAI_API_KEY)")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=request_rate, default=float("inf"),
                      help="requests per second (a Poisson process); inf: every request at once")
    load.add_argument("--burstiness", type=positive_float, default=1.0,
                      help="gamma shape of the gaps between requests: 1 is Poisson, below 1 burstier, above 1 "
                           "steadier")
    load.add_argument("--max-concurrency", type=positive_int, default=None,
                      help="most requests in flight at once (default: no limit)")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="ask for exactly the dataset's output lengths")
    load.add_argument("--seed", type=int, default=0, help="seed of the dataset and of the arrival times")
    add_dataset_args(p, num_prompts=1000)
    out = p.add_argument_group("results")
    out.add_argument("--percentile-metrics", type=_metric_names, default="ttft,tpot,itl",
                     help=f"metrics to print percentiles of, comma-separated, from {', '.join(METRICS)}")
    out.add_argument("--metric-percentiles", type=_percentage_list, default="99",
                     help="percentiles to print, comma-separated, e.g. 25,50,99")
    add_output_args(p)
    p.set_defaults(bench_func=run)
    return p
