"""EngineConfig: every engine setting in one typed object, validated at the door, passed down whole.

Field names and meanings follow vLLM's (`LLM(...)` keywords and `vllm serve` flags), so a vLLM
user's habits carry over. Unknown or invalid settings fail here, naming the setting and what is
allowed, before any actor starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ExecutorBackend = Literal["auto", "ray", "mp"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
LoadFormat = Literal["auto", "safetensors", "dummy"]
AttentionBackendName = Literal["triton", "reference"]
EpDispatch = Literal["auto", "allgather", "alltoall"]


class EngineConfig(BaseModel):
    """What to serve, how to split it, and how much memory and batch it may use."""

    # Frozen: validated once at the door; model facts travel beside it (strata/model_facts.py).
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    """Local Hugging Face directory or hub id; None serves the bundled SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer directory or id; None uses the model's."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer (as vLLM's flag): prompts must be token ids, outputs carry ids and
    no text. For checkpoints without tokenizer files, such as dummy-weight benchmarks."""
    served_model_name: str | None = None
    """Name the API reports and accepts; default: the model argument (or the bundled name)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """Ranks each layer's weights are split across (one node by default)."""
    pipeline_parallel_size: int = Field(1, ge=1)
    """Stages the decoder layers are split into (stages may span nodes)."""
    pp_layer_partition: list[int] | None = None
    """Explicit layers per stage, e.g. [8, 8, 7, 7] (or STRATA_PP_LAYER_PARTITION); None splits
    evenly. Checked against the model's layer count before any rank starts."""
    enable_expert_parallel: bool = False
    """Place whole MoE experts on ranks instead of splitting every expert across tp ranks. The
    experts' ranks form an expert-parallel group of their own (the stage's tp ranks today)."""
    ep_dispatch: EpDispatch = "auto"
    """How expert parallelism moves tokens to their experts' ranks and back.
    allgather: every EP rank has every token (attention's output is replicated), computes its
    experts' pairs and one all-reduce combines them; no host sync, so decode CUDA graphs use it.
    alltoall: each rank sends only its share of the tokens' rows to the ranks of their experts
    (all_to_all_single) and gets the results back; the split sizes are host values, one device
    sync per MoE layer, so it is never captured (graphs keep allgather).
    auto: alltoall for batches of at least ep_alltoall_min_tokens when it moves fewer bytes
    (ep_size > 2 x top_k while every EP rank holds every token), else allgather."""
    ep_alltoall_min_tokens: int = Field(512, ge=1)
    """auto's batch size (tokens in one step) from which alltoall may be chosen."""
    distributed_executor_backend: ExecutorBackend = "auto"
    """ray: rank actors on a Ray cluster; mp: local processes; auto: ray."""

    dtype: DType = "auto"
    """auto: the checkpoint's dtype on GPU, float32 on CPU."""
    load_format: LoadFormat = "auto"
    """dummy: random weights of the right shapes, no files read (benchmarks)."""
    seed: int = 0
    max_model_len: int | None = Field(None, ge=1)
    """Prompt + output tokens per request; None: the model's max_position_embeddings."""

    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """Share of each GPU's memory the engine may use (weights + activations + KV cache)."""
    cpu_kv_cache_space_gib: float = Field(1.0, gt=0.0)
    """KV cache size on CPU, in GiB (like VLLM_CPU_KVCACHE_SPACE)."""
    num_kv_blocks_override: int | None = Field(None, ge=1)
    """Fix the number of KV blocks (tests use it to force preemption)."""
    block_size: int = Field(16, ge=1, le=256)
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences running at once."""
    max_num_batched_tokens: int = Field(2048, ge=1)
    """Most tokens in one step; longer prompts are prefilled in chunks."""
    max_logprobs: int = Field(20, ge=0)
    """Largest logprobs / prompt_logprobs a request may ask for."""
    enforce_eager: bool = False
    """Run every step eagerly: no CUDA graphs (as vLLM's flag). Graphs need a GPU and an
    attention backend that can be captured (triton); on CPU every step is eager anyway."""
    async_scheduling: bool = True
    """Schedule step N+1 while step N runs on the device (vLLM's --async-scheduling): the
    engine's host work hides behind the GPU's. One rank (tp = pp = 1) only today; with more the
    engine steps synchronously (pipeline stages keep micro-batches in flight instead)."""
    cuda_graph_sizes: list[int] | None = None
    """Decode batch sizes to capture a CUDA graph for (a batch runs in the smallest that holds
    it); None: 1, 2, 4, 8, 16, 24, 32, then every 16 up to max_num_seqs."""
    attention_backend: AttentionBackendName | None = None
    """Attention kernels: "triton" (paged attention in Triton, the GPU default) or "reference"
    (gather + SDPA: exact, slow, the CPU default); None picks by device."""

    expert_load_interval: int = Field(64, ge=1)
    """MoE: steps between reads of the ranks' expert load counters (one copy to the host each);
    the counts also come in when the engine runs out of work, so a report is never left behind."""

    placement_timeout_s: float = Field(30.0, gt=0)
    """How long to wait for the placement group before failing with what the cluster has."""
    ray_address: str | None = None
    """Ray cluster to join; None: RAY_ADDRESS, else a new local Ray."""
    driver_node: str | None = None
    """Ray: the node (its Ray address) that hosts the driver, stage 0 and the Serve ingress;
    None: the head node, when it has room for a stage."""

    nnodes: int = Field(1, ge=1)
    """mp backend: how many nodes the ranks span; node k runs ranks k*W/N .. (k+1)*W/N - 1."""
    node_rank: int = Field(0, ge=0)
    """mp backend: this node's index; node 0 runs the driver (rank 0) and serves the API."""
    master_addr: str | None = None
    """mp backend across nodes: node 0's private address, where the other nodes rendezvous."""
    master_port: int = Field(29500, ge=1, le=65535)
    """mp backend across nodes: node 0's rendezvous port (torch.distributed gets a port of its own)."""
    dist_init_timeout_s: float = Field(120.0, gt=0)
    """mp backend across nodes: how long a node waits for the others before failing."""

    step_timeout_s: float = Field(60.0, gt=0)
    """A step not finished within this many seconds counts as a hung rank: the gang is rebuilt
    (the step watchdog; --step-timeout)."""
    max_recoveries: int = Field(3, ge=0)
    """Gang rebuilds allowed within recovery_window_s; one more is a persistent fault: fail-stop."""
    recovery_window_s: float = Field(600.0, gt=0)
    """The window max_recoveries counts over, in seconds."""

    @field_validator("block_size")
    @classmethod
    def _block_size_power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of two between 1 and 256, got {v}")
        return v

    @field_validator("cuda_graph_sizes")
    @classmethod
    def _graph_sizes_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"cuda_graph_sizes must be a non-empty list of batch sizes >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _nodes_consistent(self) -> EngineConfig:
        if self.nnodes == 1:
            return self
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be below nnodes={self.nnodes}")
        if self.master_addr is None:
            raise ValueError(f"nnodes={self.nnodes} needs master_addr: node 0's private address")
        if self.distributed_executor_backend == "ray":
            raise ValueError("nnodes, node_rank and master_addr are for the mp backend; on Ray, every node of "
                             "the Ray cluster is used without them")
        if self.world_size % self.nnodes:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {self.world_size} ranks do not "
                             f"split evenly over nnodes={self.nnodes}")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


def async_steps(config: EngineConfig) -> bool:
    """Whether the engine schedules a step while the previous one runs (see async_scheduling)."""
    return config.async_scheduling and config.world_size == 1


def describe_validation_error(err: Exception) -> str:
    """One line per bad setting: 'name: what is wrong (got value)'."""
    from pydantic import ValidationError

    if not isinstance(err, ValidationError):
        return str(err)
    lines = []
    for e in err.errors():
        name = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(EngineConfig.model_fields)
            lines.append(f"unknown argument {name!r}; allowed: {allowed}")
        else:
            lines.append(f"{name}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)
