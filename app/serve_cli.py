"""`strata serve [MODEL]`: the OpenAI-compatible server, with vLLM's flags and meanings.

Flags become one EngineConfig and one ServerSettings, validated before anything starts. A flag
this build cannot honour yet fails here, naming it; none is silently ignored. vLLM's spellings
work as in vLLM: `--max_model_len` is `--max-model-len`, `--config FILE` is a YAML of flags,
`--max-model-len 4k` is 4000 (4K: 4096), `--dtype half` is float16. vLLM flags whose only value
Strata has (`--no-enable-prefix-caching`, `--enable-chunked-prefill`, `--kv-cache-dtype auto`,
`-dp 1`, `--trust-remote-code`: see `check_vllm_options`) are accepted; any other value is refused,
saying what Strata does instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from strata.app.server.settings import API_KEY_ENV, VLLM_API_KEY_ENV, ServerSettings
from strata.app.vllm_flags import (
    DTYPE_ALIASES,
    FlagError,
    accept_vllm_spellings,
    check_vllm_options,
    human_readable_int,
)
from strata.app.vllm_server_flags import add_vllm_server_args, vllm_server_settings
from strata.config import EngineConfig

logger = logging.getLogger("strata")


def _partition(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts like 8,8,7,7, got {text!r}") from None


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags of every command that starts an engine (`strata serve`, `strata bench latency |
    throughput`): --model, --tokenizer, and the parallelism and engine groups."""
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or hub id (serve: the same as MODEL; default: the bundled "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or id (default: the model's)")

    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                     help="ranks each layer's weights are split across (one node)")
    par.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                     help="pipeline stages the layers are split into (stages may span nodes)")
    par.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                     help="engine replicas; Strata runs one (1 only: run several servers for data parallelism)")
    par.add_argument("--pp-layer-partition", type=_partition, default=None,
                     help="layers per pipeline stage, comma-separated, e.g. 8,8,7,7 (default: even)")
    par.add_argument("--enable-expert-parallel", action="store_true",
                     help="place whole MoE experts on ranks instead of splitting every expert across tp ranks")
    par.add_argument("--ep-dispatch", choices=["auto", "allgather", "alltoall"], default="auto",
                     help="how expert parallelism moves tokens to their experts' ranks: allgather (one all-reduce, "
                          "captured in decode graphs), alltoall (only the routed rows; one host sync per MoE "
                          "layer, eager steps only), auto: alltoall for large batches where it moves fewer bytes")
    par.add_argument("--ep-alltoall-min-tokens", type=int, default=512,
                     help="--ep-dispatch auto: the step size (tokens) from which alltoall may be chosen")
    par.add_argument("--expert-load-interval", type=int, default=64,
                     help="MoE: steps between reads of the expert load counters (a copy to the host each)")
    par.add_argument("--distributed-executor-backend", choices=["auto", "ray", "mp"], default="auto",
                     help="ray: ranks are Ray actors, the API is a Ray Serve app; mp: local processes (on "
                          "several nodes with --nnodes), the API is served by uvicorn; auto: ray (mp with --nnodes "
                          "and --master-addr)")
    par.add_argument("--address", default=None,
                     help="Ray cluster to join (default: $RAY_ADDRESS, else one on this machine, else a new "
                          "local Ray)")
    par.add_argument("--driver-node", default=None, metavar="IP",
                     help="ray backend: the node (its Ray address) for the driver, stage 0 and the API ingress "
                          "(default: the head node, when it has room for a stage)")
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16", *DTYPE_ALIASES], default="auto",
                     help="weight and activation dtype; auto: the checkpoint's on GPU, float32 on CPU; half: "
                          "float16, float: float32")
    eng.add_argument("--trust-remote-code", action="store_true",
                     help="accepted for vLLM's launch lines; changes nothing: Strata runs no code from checkpoints "
                          "(every architecture it supports loads without it)")
    eng.add_argument("--quantization", "-q", default=None,
                     help="refused: Strata runs unquantised weights only")
    eng.add_argument("--kv-cache-dtype", default="auto", help="auto only: the KV cache is in the model's dtype")
    eng.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                     help="Strata has no prefix caching: only --no-enable-prefix-caching (the default) is accepted")
    eng.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                     help="Strata always prefills long prompts in chunks of --max-num-batched-tokens: only "
                          "--enable-chunked-prefill (the default) is accepted")
    eng.add_argument("--load-format", choices=["auto", "safetensors", "dummy"], default="auto",
                     help="dummy: random weights of the right shapes, nothing read (benchmarks)")
    eng.add_argument("--seed", type=int, default=0, help="engine random seed")
    eng.add_argument("--max-model-len", type=human_readable_int, default=None,
                     help="prompt + output tokens per request, e.g. 8192, 4k (4000) or 4K (4096) (default: the "
                          "model's context length)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                     help="share of each GPU's memory the engine may use (weights, activations, KV cache)")
    eng.add_argument("--max-num-seqs", type=int, default=256, help="most sequences running at once")
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048,
                     help="most tokens in one step; longer prompts are prefilled in chunks")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block (a power of two)")
    eng.add_argument("--max-logprobs", type=int, default=20, help="largest logprobs / top_logprobs a request may ask")
    eng.add_argument("--enforce-eager", action="store_true",
                     help="run every step eagerly: no CUDA graphs for decode")
    eng.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                     help="schedule the next step while the GPU runs this one (one rank: tp = pp = 1 today)")
    eng.add_argument("--cuda-graph-sizes", type=int, nargs="+", default=None, metavar="N",
                     help="decode batch sizes to capture CUDA graphs for (default: 1 2 4 8 16 24 32, then every 16 "
                          "up to --max-num-seqs)")
    eng.add_argument("--skip-tokenizer-init", action="store_true",
                     help="run without a tokenizer: prompts must be token ids, outputs carry no text "
                          "(config-only model directories, as for dummy-weight benchmarks)")
    flt = p.add_argument_group("faults")
    flt.add_argument("--step-timeout", type=float, default=60.0, metavar="SECONDS",
                     help="a step running longer than this counts as a hung rank: the gang is rebuilt (default: 60)")
    flt.add_argument("--max-recoveries", type=int, default=3,
                     help="gang rebuilds allowed within --recovery-window; one more fails stop (default: 3)")
    flt.add_argument("--recovery-window", type=float, default=600.0, metavar="SECONDS",
                     help="the window --max-recoveries counts over (default: 600)")
    eng.add_argument("--attention-backend", choices=["triton", "reference"], default=None,
                     help="attention kernels (default: triton on a GPU, reference on CPU)")



def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="serve the OpenAI-compatible HTTP API",
        description="Serve a model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, ...), "
                    "split across GPUs and nodes on Ray. Flags follow `vllm serve`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model directory or hub id (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="names the API accepts in `model`; the first is the one it reports (default: MODEL)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML file of flags, as vLLM's: keys are flag names without the dashes (max-model-len: 4k, "
                        "enforce-eager: true); flags on the command line win")
    add_engine_args(p)
    mn = p.add_argument_group("mp backend across nodes",
                              "Run the same command on every node: node 0 serves the API, the others add "
                              "--headless. Node k runs ranks k*W/N .. (k+1)*W/N-1 (W = tp x pp).")
    mn.add_argument("--nnodes", type=int, default=None, help="number of nodes the ranks span")
    mn.add_argument("--node-rank", type=int, default=None, help="this node's index, 0 .. nnodes-1")
    mn.add_argument("--master-addr", default=None,
                    help="node 0's private address; node 0 listens there for the other nodes")
    mn.add_argument("--master-port", type=int, default=None, help="node 0's rendezvous port (default: 29500)")
    mn.add_argument("--headless", action="store_true",
                    help="run this node's ranks only, no API server (every node but node 0)")
    mn.add_argument("--dist-init-timeout", type=float, default=120.0,
                    help="seconds a node waits for the others before failing, naming those that did not join")

    srv = p.add_argument_group("server")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on; 0.0.0.0 (or the node's address) to accept remote clients")
    srv.add_argument("--port", type=int, default=8000, help="port to listen on")
    srv.add_argument("--api-key", default=None,
                     help=f"require `Authorization: Bearer KEY` on every route but /health (default: ${API_KEY_ENV}, "
                          f"else ${VLLM_API_KEY_ENV})")
    srv.add_argument("--generation-config", default="auto",
                     help="request defaults (temperature, top_p, top_k, min_p, repetition_penalty, max_tokens) for "
                          "what a request leaves unset: auto: the model's generation_config.json; vllm: "
                          "SamplingParams' own; or a folder holding a generation_config.json")
    srv.add_argument("--max-waiting-requests", type=int, default=256,
                     help="beyond this many queued sequences, answer 503 with Retry-After")
    srv.add_argument("--max-n", type=int, default=16, help="largest `n` a request may ask for")
    srv.add_argument("--max-tokens-cap", type=int, default=None,
                     help="largest max_tokens a request may ask for (default: only max-model-len limits it)")
    srv.add_argument("--drain-timeout", type=float, default=30.0,
                     help="on Ctrl-C / SIGTERM, seconds in-flight requests may run before they are cut off")
    srv.add_argument("--uvicorn-log-level", choices=["critical", "error", "warning", "info", "debug", "trace"],
                     default="info", help="log level of the HTTP server")
    add_vllm_server_args(srv)
    p.set_defaults(func=run_serve)
    accept_vllm_spellings(p)
    return p


def pick_backend(args: argparse.Namespace) -> str:
    """auto is ray (Strata is a Ray application); mp only with the mp-only multi-node flags."""
    backend = args.distributed_executor_backend
    if backend == "auto":
        multi_node_mp = args.nnodes is not None and args.master_addr is not None
        backend = "mp" if multi_node_mp else "ray"
        logger.info("--distributed-executor-backend auto: using %s%s", backend,
                    " (--nnodes with --master-addr)" if multi_node_mp else "")
    return backend


def check_flags(args: argparse.Namespace, backend: str) -> None:
    """Fails on every flag this build cannot honour, or combination that makes no sense, naming it."""
    multi_node = args.nnodes is not None and args.nnodes > 1
    if multi_node and not args.master_addr:
        raise FlagError(f"--nnodes {args.nnodes} needs --master-addr: node 0's private address")
    if multi_node and backend != "mp":
        raise FlagError(f"--nnodes {args.nnodes} is for the mp backend; with ray, start a Ray cluster on every node "
                        f"(`ray start`, or cluster/run_cluster.sh) and run `strata serve` once, on the head")
    if not multi_node:
        for flag, given in (("--node-rank", args.node_rank), ("--master-addr", args.master_addr),
                            ("--master-port", args.master_port is not None), ("--headless", args.headless)):
            if given:
                raise FlagError(f"{flag} is for the mp backend across nodes; it needs --nnodes N (N > 1)")
    node_rank = args.node_rank or 0
    if multi_node and node_rank > 0 and not args.headless:
        raise FlagError(f"--node-rank {node_rank}: only node 0 serves the API; add --headless on the other nodes")
    if args.headless and node_rank == 0:
        raise FlagError("--headless: node 0 hosts the driver and serves the API; --headless is for --node-rank "
                        "1 .. nnodes-1")
    if args.driver_node and backend != "ray":
        raise FlagError("--driver-node names a Ray node; it needs --distributed-executor-backend ray (or auto)")
    if args.address and backend != "ray":
        raise FlagError("--address names a Ray cluster; it needs --distributed-executor-backend ray (or auto)")
    if args.model and args.model_tag and args.model != args.model_tag:
        raise FlagError(f"MODEL {args.model_tag!r} and --model {args.model!r} disagree; give one")


def engine_config_from_args(args: argparse.Namespace, backend: str, **fields: Any) -> EngineConfig:
    """The EngineConfig of `add_engine_args`' flags (plus `fields`, the caller's own); raises
    FlagError for a vLLM flag with a value Strata does not run (`check_vllm_options`), and
    pydantic's ValidationError (see `describe_flags`)."""
    check_vllm_options({key: getattr(args, key) for key in (
        "trust_remote_code", "enable_prefix_caching", "enable_chunked_prefill", "quantization", "kv_cache_dtype",
        "data_parallel_size")})
    return EngineConfig(**{
        "model": args.model, "tokenizer": args.tokenizer, "skip_tokenizer_init": args.skip_tokenizer_init,
        "tensor_parallel_size": args.tensor_parallel_size, "pipeline_parallel_size": args.pipeline_parallel_size,
        "pp_layer_partition": args.pp_layer_partition, "enable_expert_parallel": args.enable_expert_parallel,
        "ep_dispatch": args.ep_dispatch, "ep_alltoall_min_tokens": args.ep_alltoall_min_tokens,
        "expert_load_interval": args.expert_load_interval,
        "distributed_executor_backend": backend, "dtype": DTYPE_ALIASES.get(args.dtype, args.dtype),
        "load_format": args.load_format,
        "seed": args.seed, "max_model_len": args.max_model_len, "gpu_memory_utilization": args.gpu_memory_utilization,
        "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens, "max_logprobs": args.max_logprobs,
        "enforce_eager": args.enforce_eager, "cuda_graph_sizes": args.cuda_graph_sizes,
        "async_scheduling": args.async_scheduling,
        "attention_backend": args.attention_backend, "ray_address": args.address, "driver_node": args.driver_node,
        "step_timeout_s": args.step_timeout, "max_recoveries": args.max_recoveries,
        "recovery_window_s": args.recovery_window,
        **fields,
    })


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServerSettings]:
    backend = pick_backend(args)
    check_flags(args, backend)
    names = args.served_model_name
    try:
        config = engine_config_from_args(
            args, backend, model=args.model or args.model_tag, served_model_name=names[0] if names else None,
            nnodes=args.nnodes or 1, node_rank=args.node_rank or 0, master_addr=args.master_addr,
            dist_init_timeout_s=args.dist_init_timeout,
            **({"master_port": args.master_port} if args.master_port is not None else {}),
        )
        extra = {"api_key": args.api_key} if args.api_key else {}  # else $STRATA_API_KEY or $VLLM_API_KEY
        settings = ServerSettings(
            host=args.host, port=args.port, served_model_name=names, max_waiting_requests=args.max_waiting_requests,
            max_n=args.max_n, max_tokens_cap=args.max_tokens_cap, drain_timeout_s=args.drain_timeout,
            uvicorn_log_level=args.uvicorn_log_level, generation_config=args.generation_config, **extra,
            **vllm_server_settings(args),
        )
    except ValidationError as err:
        raise FlagError(describe_flags(err)) from None
    folder = settings.generation_config
    if folder not in ("auto", "vllm") and not os.path.isfile(os.path.join(os.path.expanduser(folder),
                                                                          "generation_config.json")):
        raise FlagError(f"--generation-config {folder}: no generation_config.json there (give auto, vllm, or a "
                        f"folder that holds one)")
    return config, settings


_FLAG_OF = {"ray_address": "--address", "model": "MODEL"}


def _flag_of(field: str) -> str:
    """The flag that sets a config field: its name with dashes, less the `_s` of seconds
    (step_timeout_s is --step-timeout)."""
    return _FLAG_OF.get(field, "--" + field.removesuffix("_s").replace("_", "-"))


def describe_flags(err: ValidationError) -> str:
    """'--flag: what is wrong (got value)', one per bad flag."""
    problems = []
    for e in err.errors():
        if not e["loc"]:  # a rule across several flags
            problems.append(str(e["msg"]).removeprefix("Value error, "))
            continue
        field = str(e["loc"][0])
        problems.append(f"{_flag_of(field)}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(problems)


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config, settings = configs_from_args(args)
    except FlagError as err:
        print(f"strata serve: error: {err}", file=sys.stderr)
        return 2
    from strata.app.server.launch import serve_headless, serve_with_ray, serve_with_uvicorn

    if args.headless:
        return serve_headless(config, settings)
    if config.distributed_executor_backend == "mp":
        return serve_with_uvicorn(config, settings)
    return serve_with_ray(config, settings)


def main(argv: list[str] | None = None) -> int:
    """`strata serve` alone (used by `python -m strata.app.job`)."""
    parser = argparse.ArgumentParser(prog="strata")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
