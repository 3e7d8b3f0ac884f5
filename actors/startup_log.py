"""The lines the engine prints at start: where every rank went, how big the KV cache is, which
attention kernels run and which CUDA graphs were captured."""

from __future__ import annotations

import logging

from strata.config import EngineConfig

logger = logging.getLogger("strata")


def log_startup(config: EngineConfig, rank_facts: list[dict], num_blocks: int, max_model_len: int) -> None:
    tp, pp = config.tensor_parallel_size, config.pipeline_parallel_size
    logger.info("parallelism: tensor_parallel_size=%d, pipeline_parallel_size=%d, %d rank(s)%s",
                tp, pp, tp * pp,
                f", expert parallel over {tp} ranks ({config.ep_dispatch} dispatch)" if config.enable_expert_parallel
                else "")
    for stage in range(pp):
        members = [f for f in rank_facts if f["pp_rank"] == stage]
        hosts = sorted({f"{f['host']} ({f['ip']})" for f in members})
        devices = ", ".join(f"rank {f['rank']}: {f['device']}" for f in members)
        start, end = members[0]["layers"]
        logger.info("stage %d -> %s -> [%s] -> layers %d-%d (%d layers)", stage, ", ".join(hosts), devices,
                    start, end - 1, end - start)
    for f in rank_facts:
        logger.info("rank %d (tp %d, pp %d, pid %s) on %s %s: %.1f MiB of %s weights loaded in %.1f s",
                    f["rank"], f["tp_rank"], f["pp_rank"], f.get("pid", "?"), f["host"], f["gpu"],
                    f["param_bytes"] / 2**20,
                    f["dtype"], f["load_seconds"])
    tokens = num_blocks * config.block_size
    logger.info("KV cache size: %s tokens", f"{tokens:,}")
    logger.info("Maximum concurrency for %s tokens per request: %.2fx", f"{max_model_len:,}",
                tokens / max_model_len)
    first = rank_facts[0]
    logger.info("attention backend: %s", first.get("attention_backend", "?"))
    sizes = first.get("cuda_graphs") or []
    if sizes:
        slowest = max(f.get("graph_seconds", 0.0) for f in rank_facts)
        memory = max(f.get("graph_bytes", 0) for f in rank_facts)
        logger.info("CUDA graphs: captured %d (decode batch sizes %s) in %.1f s, %.0f MiB per rank",
                    len(sizes), _ranges(sizes), slowest, memory / 2**20)
    else:
        logger.info("CUDA graphs: none (%s); every step runs eagerly", first.get("graphs_off") or "?")


def _ranges(sizes: list[int]) -> str:
    """1, 2, 4, 8, 16, 24, 32, 48, ..., 256 -> '1, 2, 4, 8, 16, 24, 32, 48..256'."""
    if len(sizes) <= 8:
        return ", ".join(map(str, sizes))
    return ", ".join(map(str, sizes[:7])) + f", {sizes[7]}..{sizes[-1]}"


def log_gang(rank_facts: list[dict], seconds: float) -> None:
    """After a rebuild: the new gang's processes (tests and operators find a rank by its pid)."""
    pids = ", ".join(f"rank {f['rank']} pid {f.get('pid', '?')}" for f in rank_facts)
    logger.info("new gang up in %.1f s (weights loaded, KV cache allocated): %s", seconds, pids)
