"""Sizing and allocating the paged KV cache of one rank.

GPU: profile one forward at the largest batch (max_num_batched_tokens), then give the cache
`gpu_memory_utilization * total - peak - memory held outside torch`. CPU: a set amount of RAM
(`cpu_kv_cache_space_gib`). The engine takes the minimum over all ranks so every rank's cache
holds the same block ids.
"""

from __future__ import annotations

import logging
import math

import torch

from strata.config import EngineConfig
from strata.model.architectures.intermediate import IntermediateTensors
from strata.model.layers.attention import AttentionMetadata

logger = logging.getLogger("strata")


def bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    per_layer = math.prod(model.kv_cache_shape(1, block_size)) * torch.tensor([], dtype=dtype).element_size()
    return per_layer * model.num_local_layers


def allocate_kv_caches(model, num_blocks: int, block_size: int, dtype, device) -> list[torch.Tensor]:
    # Zeros, not empty: masked attention weights are 0, and 0 * NaN garbage would still be NaN.
    shape = model.kv_cache_shape(num_blocks, block_size)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_local_layers)]


@torch.inference_mode()
def profile_num_blocks(model, config: EngineConfig, hidden_size: int, is_first_stage: bool,
                       dtype: torch.dtype, device: torch.device, graph_tokens: int = 0) -> int:
    """How many KV blocks this rank can hold after its weights, peak activations and (when
    `graph_tokens` > 0) the CUDA graphs' memory pool, measured as the activations of one decode
    forward of `graph_tokens` sequences (the largest graph; the smaller ones share its pool)."""
    per_block = max(1, bytes_per_block(model, config.block_size, dtype))
    if config.num_kv_blocks_override is not None:
        return config.num_kv_blocks_override
    if device.type != "cuda":
        return int(config.cpu_kv_cache_space_gib * 2**30) // per_block
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    num_tokens = config.max_num_batched_tokens
    _profile_forward(model, num_tokens, min(config.max_num_seqs, num_tokens), config.block_size, hidden_size,
                     is_first_stage, dtype, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    outside_torch = max(0, total - free - torch.cuda.memory_reserved(device))
    graphs = 0
    if graph_tokens:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        _profile_forward(model, graph_tokens, graph_tokens, config.block_size, hidden_size, is_first_stage,
                         dtype, device)
        graphs = torch.cuda.max_memory_allocated(device) - base
    budget = int(config.gpu_memory_utilization * total) - peak - outside_torch - graphs
    logger.info(
        "memory profile: total %.1f GiB, peak torch %.2f GiB, outside torch %.2f GiB, CUDA graphs %.0f MiB, "
        "KV budget %.2f GiB", total / 2**30, peak / 2**30, outside_torch / 2**30, graphs / 2**20, budget / 2**30,
    )
    torch.cuda.empty_cache()
    return max(0, budget // per_block)


def _profile_forward(model, num_tokens: int, num_seqs: int, block_size: int, hidden_size: int,
                     is_first_stage: bool, dtype, device) -> None:
    """A forward over `num_tokens` tokens of `num_seqs` sequences with a throwaway cache just big enough."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
    blocks_per_seq = [math.ceil(n / block_size) for n in lens]
    caches = allocate_kv_caches(model, sum(blocks_per_seq), block_size, dtype, device)
    tables, next_block = [], 0
    for n in blocks_per_seq:
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    attn, positions = AttentionMetadata.build(lens, [0] * num_seqs, tables, block_size, device)
    input_ids = intermediate = None
    if is_first_stage:
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    else:
        intermediate = IntermediateTensors(*(torch.zeros(num_tokens, hidden_size, dtype=dtype, device=device)
                                             for _ in IntermediateTensors.FIELDS))
    out = model(input_ids, positions, caches, attn, intermediate)
    if isinstance(out, torch.Tensor):
        model.compute_logits(out[:num_seqs])
    del caches
