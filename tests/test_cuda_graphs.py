"""CUDA graph buckets and the padded decode rows a replay reads (CPU: the buffers' contents)."""

from __future__ import annotations

import numpy as np
import pytest

from strata.actors.worker.cuda_graphs import graph_batch_sizes
from strata.actors.worker.input_buffers import InputBuffers
from tests.test_input_buffers import BLOCK, MAX_B, MAX_T, MAX_W, step_inputs


def test_default_buckets_follow_vllm_and_always_hold_max_num_seqs() -> None:
    assert graph_batch_sizes(256) == [1, 2, 4, 8, 16, 24, 32, *range(48, 257, 16)]
    assert graph_batch_sizes(100)[-3:] == [80, 96, 100]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(64, [8, 1, 500]) == [1, 8, 64]


def test_padded_decode_rows_write_nothing_and_see_no_keys() -> None:
    """A larger step leaves real slots in rows 3..7; a 3-row step padded to 8 must overwrite them
    (slot -1, length 0, one query each), or a replay would write into another sequence's cache."""
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    tables = [[10 + i] for i in range(8)]
    buffers.prepare(step_inputs([1] * 8, [2] * 8, tables))
    assert (buffers.slot_mapping[:8] >= 0).all()
    ids, positions, attn = buffers.prepare(step_inputs([1] * 3, [1, 2, 3], tables[:3]), pad_to=8)
    assert ids.shape[0] == 3 and attn.num_seqs == 3  # the eager views stay the real rows
    assert buffers.slot_mapping[3:8].tolist() == [-1] * 5
    assert buffers.seq_lens[3:8].tolist() == [0] * 5
    assert buffers.query_start_loc[:9].tolist() == list(range(9))
    assert buffers.slot_mapping[:3].tolist() == [10 * BLOCK + 1, 11 * BLOCK + 2, 12 * BLOCK + 3]
    _, _, graph_attn = buffers.decode_views(8, max_seq_len=MAX_W * BLOCK)
    assert graph_attn.block_tables.shape == (8, MAX_W) and graph_attn.max_seq_len == MAX_W * BLOCK
    np.testing.assert_array_equal(graph_attn.seq_lens[:3].numpy(), [2, 3, 4])


def test_only_decode_steps_are_padded() -> None:
    buffers = InputBuffers(MAX_T, MAX_B, MAX_W, BLOCK, "cpu")
    with pytest.raises(ValueError, match="pad_to=4 needs a decode step"):
        buffers.prepare(step_inputs([2, 1], [0, 0], [[1], [2]]), pad_to=4)
    with pytest.raises(ValueError, match="pad_to=9"):
        buffers.prepare(step_inputs([1], [0], [[1]]), pad_to=MAX_B + 1)


def test_graphs_are_off_where_they_cannot_or_have_not_run(monkeypatch) -> None:
    import torch

    from strata.actors.worker.rank import graphs_off_reason
    from strata.config import EngineConfig
    from strata.model.layers.moe import FusedMoE

    class Model:  # what the decision reads of a model: its attention backend, and MoE or not
        attention_backend = type("Backend", (), {"name": "triton", "supports_cuda_graphs": True})()

    class Moe(Model):
        expert_load = None

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert graphs_off_reason(EngineConfig(), gpu, Model()) is None
    assert graphs_off_reason(EngineConfig(), cpu, Model()) == "no GPU"
    assert graphs_off_reason(EngineConfig(enforce_eager=True), gpu, Model()) == "--enforce-eager"
    assert graphs_off_reason(EngineConfig(), gpu, Moe()) is None  # the fused MoE path captures
    monkeypatch.setattr(FusedMoE, "backend", "reference")
    assert "MoE" in graphs_off_reason(EngineConfig(), gpu, Moe())
    assert "2 ranks" in graphs_off_reason(EngineConfig(tensor_parallel_size=2), gpu, Model())
    assert graphs_off_reason(EngineConfig(tensor_parallel_size=2, cuda_graph_sizes=[1, 8]), gpu, Model()) is None
