"""The memory-bandwidth floor of a decode step, from bandwidth measured on this machine.

Batch-1 decode is bound by reading bytes, not by arithmetic: every step each GPU reads its
weights (for MoE, the experts the batch routes to) and its share of the KV cache. Stages of a
pipeline run one after another for one token, so their floors add up.
"""

from __future__ import annotations

import torch


def measure_hbm_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy (read + write counted) on GPU 0; 1.0 on CPU."""
    if not torch.cuda.is_available():
        return 1.0
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 * repeats / seconds


def _expert_bytes_per_rank(shape: dict, layers: int, tp: int) -> int:
    experts = shape.get("num_local_experts") or shape.get("num_experts") or 0
    if not experts:
        return 0
    inter = shape.get("moe_intermediate_size") or shape["intermediate_size"]
    return layers * experts * 3 * shape["hidden_size"] * inter * 2 // tp  # TP or EP: an even share


def decode_step_floor_s(shape: dict, rank_facts: list[dict], batch: int, context: int, tp: int,
                        bandwidth: float) -> float:
    experts = shape.get("num_local_experts") or shape.get("num_experts") or 0
    top_k = shape.get("num_experts_per_tok", 0)
    # Expected share of experts a batch touches: 1 - (1 - 1/E)^(batch * top_k).
    touched = 1 - (1 - 1 / experts) ** (batch * top_k) if experts else 1.0
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    kv_heads = max(1, shape["num_key_value_heads"] // tp)
    total = 0.0
    for stage in sorted({f["pp_rank"] for f in rank_facts}):
        ranks = [f for f in rank_facts if f["pp_rank"] == stage]
        start, end = ranks[0]["layers"]
        expert = _expert_bytes_per_rank(shape, end - start, tp)
        weights = max(f["param_bytes"] for f in ranks) - expert + expert * touched
        kv = batch * context * (end - start) * 2 * kv_heads * head_dim * 2
        total += (weights + kv) / bandwidth
    return total
