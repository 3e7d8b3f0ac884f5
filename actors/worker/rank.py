"""The rank: one model shard and its KV cache on one GPU (or CPU slot), running steps.

Lifecycle, the same under Ray and multiprocessing:
  1. `bring_up`: join the process groups, load this rank's slice of the weights, size the KV
     cache (minimum over all ranks), allocate it, and share start-up facts with every rank.
  2. rank 0 (the driver) calls `execute` per step itself, after publishing the plan; every
     other rank sits in `run_loop`, reading plans from the plan channel until a shutdown plan. One Ray call
     starts the loop; per-step Ray calls would be too slow for decode.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time

import msgpack
import torch
from transformers import AutoConfig

from strata.actors.nodes.node_address import node_ip, set_socket_ifname_for
from strata.actors.worker.cuda_graphs import graph_batch_sizes
from strata.actors.worker.host_memory import PeakAnonMemory
from strata.actors.worker.kv_cache import allocate_kv_caches, profile_num_blocks
from strata.actors.worker.model_runner import ModelRunner
from strata.actors.worker.plan_channel import PlanSubscriber
from strata.config import EngineConfig
from strata.distributed.channel import all_gather_msgpack, all_reduce_min, isend_bytes
from strata.distributed.process_groups import init_rank_groups
from strata.distributed.rank_layout import rank_coords
from strata.distributed.step_plan import StepPlan
from strata.model.architectures.partition import layer_range_for_stage
from strata.model.context import ModelContext
from strata.model.grammar import GrammarSource
from strata.model.layers.moe import FusedMoE
from strata.model.loader import load_model
from strata.model_facts import ModelFacts

logger = logging.getLogger("strata")

# Tests set this to a rank number to make that rank fail while starting (as vLLM's VLLM_TEST_*).
FAIL_RANK_ENV = "STRATA_TEST_FAIL_RANK"


def resolve_dtype(config: EngineConfig, hf_config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type != "cuda":
        return torch.float32  # the CPU reference path; half precision on CPU is slow and lossy
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    # As vLLM: half-precision checkpoints keep their type, float32 ones run in bfloat16.
    return checkpoint if checkpoint in (torch.float16, torch.bfloat16) else torch.bfloat16


class RankWorker:
    def __init__(self, config_json: str, facts_json: str, rank: int, local_device_index: int = 0):
        # A Ray actor's root logger shows warnings only; the start-up lines are INFO.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = EngineConfig.model_validate_json(config_json)
        self.facts = ModelFacts.from_json(facts_json)
        self.coords = rank_coords(rank, self.config.tensor_parallel_size, self.config.pipeline_parallel_size)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_device_index)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.runner: ModelRunner | None = None
        self.graphs_off: str | None = None
        self.groups = None
        self.num_blocks = 0

    def node_ip(self, master_addr: str | None = None) -> str:
        """This node's private address: STRATA_HOST_IP, else Ray's, else the route toward the master."""
        return node_ip(toward=master_addr)

    def bring_up(self, master_addr: str, master_port: int, listener: socket.socket | None = None) -> list[dict]:
        """Joins, loads, sizes the KV cache. Returns every rank's start-up facts, in rank order.
        Rank 0 may pass the socket it already listens on for torch.distributed's store."""
        if os.environ.get(FAIL_RANK_ENV) == str(self.coords.rank):  # fault injection, for tests
            raise RuntimeError(f"injected start-up failure of rank {self.coords.rank} ({FAIL_RANK_ENV})")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # the current device is per thread
        cfg = self.config
        ip = self.node_ip(master_addr)
        if self.coords.world_size > 1:
            ifname = set_socket_ifname_for(ip)
            _log_network(self.coords.rank, ip, ifname)
        self.groups = init_rank_groups(self.coords, master_addr, master_port, self.device, listener=listener,
                                       expert_parallel=cfg.enable_expert_parallel)
        hf_config = AutoConfig.from_pretrained(self.facts.model_dir)
        dtype = resolve_dtype(cfg, hf_config, self.device)
        layer_range = layer_range_for_stage(list(self.facts.layer_partition), self.coords.pp_rank)
        ctx = ModelContext(tp=self.groups.tp, pp_rank=self.coords.pp_rank, pp_size=self.coords.pp_size,
                           layer_range=layer_range, dtype=dtype, device=self.device,
                           enable_expert_parallel=cfg.enable_expert_parallel, ep_group=self.groups.ep,
                           ep_dispatch=cfg.ep_dispatch, ep_alltoall_min_tokens=cfg.ep_alltoall_min_tokens,
                           attention_backend=cfg.attention_backend)
        load_started = time.time()
        with PeakAnonMemory() as load_memory:
            model = load_model(self.facts.model_dir, hf_config, ctx, cfg.load_format, seed=cfg.seed)
        load_seconds = time.time() - load_started
        graph_sizes = self._graph_sizes(model)
        capacity = profile_num_blocks(model, cfg, hf_config.hidden_size, self.coords.is_first_stage,
                                      dtype, self.device, graph_tokens=max(graph_sizes, default=0))
        self.num_blocks = all_reduce_min(capacity, self.groups.control)
        caches = allocate_kv_caches(model, self.num_blocks, cfg.block_size, dtype, self.device)
        # The longest sequence a step can hold: the asked (or the model's) length, within the cache.
        max_model_len = min(self.facts.max_model_len(cfg), self.num_blocks * cfg.block_size)
        self.runner = ModelRunner(model, caches, self.groups, cfg.block_size, hf_config.hidden_size,
                                  dtype, self.device, max_num_seqs=cfg.max_num_seqs,
                                  max_model_len=max(1, max_model_len),
                                  max_num_batched_tokens=cfg.max_num_batched_tokens,
                                  graph_sizes=graph_sizes, grammars=self._grammar_source(hf_config))
        graphs = self.runner.capture_graphs()
        if self.runner.is_moe:
            model.expert_load()  # the profiling forward routed dummy tokens: do not report them
        facts = {
            "rank": self.coords.rank, "tp_rank": self.coords.tp_rank, "pp_rank": self.coords.pp_rank,
            "pid": os.getpid(), "host": socket.gethostname(), "ip": ip, "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "layers": list(layer_range), "dtype": str(dtype).removeprefix("torch."),
            "param_bytes": model.param_bytes(), "load_peak_bytes": load_memory.growth,
            "load_seconds": round(load_seconds, 2), "kv_blocks_capacity": capacity,
            "num_blocks": self.num_blocks, "moe": self.runner.is_moe,
            "attention_backend": model.attention_backend.name,
            "cuda_graphs": graphs.sizes if graphs else [],
            "graph_seconds": round(graphs.seconds, 2) if graphs else 0.0,
            "graph_bytes": graphs.memory_bytes if graphs else 0, "graphs_off": self.graphs_off,
        }
        return all_gather_msgpack(facts, self.groups.control, self.coords.world_size)

    def _grammar_source(self, hf_config) -> GrammarSource | None:
        """The sampling rank compiles structured-output grammars from the model's tokenizer files."""
        if not self.coords.is_sampler or self.facts.tokenizer_dir is None:
            return None
        return GrammarSource(self.facts.tokenizer_dir, hf_config.vocab_size, list(self.facts.eos_token_ids))

    def _graph_sizes(self, model) -> list[int]:
        """The decode batch sizes this rank captures CUDA graphs for; [] runs every step eagerly
        (`self.graphs_off` says why)."""
        cfg = self.config
        self.graphs_off = graphs_off_reason(cfg, self.device, model)
        if self.graphs_off:
            return []
        # Not more rows than a step may hold tokens: a decode step of B sequences has B tokens.
        return graph_batch_sizes(min(cfg.max_num_seqs, cfg.max_num_batched_tokens), cfg.cuda_graph_sizes)

    def execute(self, plan: StepPlan, defer: bool = False):
        return self.runner.execute(plan, defer)

    def run_loop(self) -> int:
        """Non-driver ranks: read and run plans from the plan channel until shutdown. Returns the
        steps run."""
        steps = 0
        plans = PlanSubscriber(self.groups.control)
        while True:
            plan = StepPlan.decode(plans.next())
            if plan.kind == "shutdown":
                self.runner.pending.wait_all()
                plans.close()
                return steps
            result = self.runner.execute(plan)
            if result is not None:  # the sampling rank of a pipeline: results go to the driver
                isend_bytes(result.encode(), 0, self.groups.control, self.runner.pending)
            load = self.runner.expert_load(plan)
            if load is not None:
                isend_bytes(msgpack.packb(load), 0, self.groups.control, self.runner.pending)
            steps += 1

    def step_times(self) -> list[tuple[float, float]]:
        return list(self.runner.step_times) if self.runner else []

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        # The mp driver's rank 0 lives in the caller's process: give its GPU memory back, so a
        # second engine there (or the caller's own work) can size itself on a free card.
        self.runner = None
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def graphs_off_reason(config: EngineConfig, device: torch.device, model) -> str | None:
    """Why decode steps cannot run in CUDA graphs here, or None when they can."""
    if device.type != "cuda":
        return "no GPU"
    if config.enforce_eager:
        return "--enforce-eager"
    if not model.attention_backend.supports_cuda_graphs:
        return f"the {model.attention_backend.name} attention backend cannot be captured"
    if hasattr(model, "expert_load") and FusedMoE.backend == "reference":
        return "the reference MoE layer reads its expert counts on the host"
    if config.world_size > 1 and config.cuda_graph_sizes is None:
        # Captured collectives (NCCL inside the graph) have not run on a multi-GPU machine yet.
        return f"not yet validated with {config.world_size} ranks; pass --cuda-graph-sizes to try them"
    return None


def _log_network(rank: int, ip: str, ifname: str | None) -> None:
    """One line per rank, in that rank's own log (Ray prefixes it with the node's address), so a
    user can see that NCCL_* / GLOO_* settings and STRATA_FORWARD_ENV reached every node."""
    comm = sorted(k for k in os.environ if k.startswith(("NCCL_", "GLOO_")))
    listed = [v.strip() for v in os.environ.get("STRATA_FORWARD_ENV", "").split(",") if v.strip()]
    logger.info("rank %d on %s via %s; %s; STRATA_FORWARD_ENV present: %s", rank, ip, ifname or "?",
                ", ".join(f"{k}={os.environ[k]}" for k in comm) or "no NCCL_/GLOO_ settings",
                ", ".join(v for v in listed if v in os.environ) or "none")
