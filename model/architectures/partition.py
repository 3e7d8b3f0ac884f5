"""How decoder layers are split into pipeline stages.

A partition is a list of P positive layer counts, one per stage, summing to the model's layer count.
The even split gives every stage num_layers // P layers; the remainder goes one each to the stages
just before the last (as vLLM), because the last stage also runs the LM head and the sampler.
Example: 30 layers on 4 stages -> [7, 8, 8, 7].
"""

from __future__ import annotations


def check_partition(partition: list[int], num_layers: int, pp_size: int) -> list[int]:
    """Returns `partition` if it is P counts >= 1 summing to num_layers, else raises ValueError."""
    if len(partition) != pp_size or any(n < 1 for n in partition) or sum(partition) != num_layers:
        raise ValueError(
            f"layer partition {partition} is invalid: it needs pipeline_parallel_size={pp_size} numbers, "
            f"each >= 1, summing to num_hidden_layers={num_layers}"
        )
    return list(partition)


def even_layer_partition(num_layers: int, pp_size: int) -> list[int]:
    if pp_size < 1 or num_layers < pp_size:
        raise ValueError(
            f"cannot split num_hidden_layers={num_layers} over pipeline_parallel_size={pp_size}: "
            f"every stage needs at least one layer (pp size must be between 1 and {num_layers})"
        )
    base, extra = divmod(num_layers, pp_size)
    partition = [base] * pp_size
    for i in range(extra):
        partition[pp_size - 2 - i] += 1  # stages before the last, walking backwards
    return partition


def layer_range_for_stage(partition: list[int], pp_rank: int) -> tuple[int, int]:
    """[start, end) decoder layers of stage `pp_rank`."""
    check_partition(partition, sum(partition), len(partition))
    if not 0 <= pp_rank < len(partition):
        raise ValueError(f"pp_rank={pp_rank} is outside 0..{len(partition) - 1} for partition {partition}")
    start = sum(partition[:pp_rank])
    return start, start + partition[pp_rank]
