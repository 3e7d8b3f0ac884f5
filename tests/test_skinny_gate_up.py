"""The dense MLP's gate_up and SiLU-and-mul in one launch (model/kernels/skinny_gate_up.py) against
F.linear then `SiluAndMul`, under Triton's interpreter on CPU (float32 / float16) and compiled on a
GPU; and which products take it (only shapes the tuned table names, on CUDA)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.distributed.process_groups import single_rank_group  # noqa: E402
from strata.model.context import ModelContext  # noqa: E402
from strata.model.kernels import skinny_gate_up  # noqa: E402
from strata.model.layers.activation import SiluAndMul  # noqa: E402
from strata.model.layers.linear import MergedColumnParallelLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
             torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear then SiLU-and-mul, each rounded to x's dtype (the engine's unfused path)."""
    return SiluAndMul.forward_torch(torch.nn.functional.linear(x.float(), w.float()).to(x.dtype).float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,inter,hidden,tiles", [
    (1, 48, 200, (32, 64, 4, 2)),    # I and H not multiples of their tiles
    (5, 64, 128, (16, 128, 4, 3)),
    (17, 40, 96, (16, 32, 2, 2)),    # the 32-row bucket
])
def test_matches_linear_then_silu_and_mul(rows, inter, hidden, tiles, dtype):
    torch.manual_seed(rows)
    x = torch.randn(rows, hidden, dtype=dtype, device=DEVICE)
    w = (torch.randn(2 * inter, hidden, device=DEVICE) / hidden**0.5).to(dtype)
    got = skinny_gate_up.gate_up_silu(x, w, *tiles)
    assert got.shape == (rows, inter) and got.dtype == dtype
    torch.testing.assert_close(got, reference(x, w), **TOLERANCE[dtype])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="weight \\[2I, H\\]"):
        skinny_gate_up.gate_up_silu(torch.randn(2, 8), torch.randn(7, 8), 16, 16, 4, 2)  # odd rows
    with pytest.raises(ValueError, match="M <= 32"):
        skinny_gate_up.gate_up_silu(torch.randn(33, 8), torch.randn(8, 8), 16, 16, 4, 2)


def merged(hidden: int, inter: int, dtype: torch.dtype) -> MergedColumnParallelLinear:
    layer = MergedColumnParallelLinear(hidden, [inter, inter], ModelContext(tp=single_rank_group(), dtype=dtype,
                                                                              device=torch.device(DEVICE)))
    with torch.no_grad():
        layer.weight.normal_(0, hidden**-0.5)
    return layer


def test_only_named_cuda_shapes_take_it(monkeypatch):
    """Off CUDA, or for a shape the table does not name, the matmul then the activation; on CUDA
    with an entry for (2I, H, rows bucket), the one launch (and the same values)."""
    layer = merged(64, 32, torch.float16 if DEVICE == "cuda" else torch.float32)
    key = skinny_gate_up.gate_up_key(64, 64, 16)
    monkeypatch.setattr(skinny_gate_up, "load_tiles", lambda: {key: (16, 32, 4, 2)})
    calls = []
    real = skinny_gate_up.gate_up_silu
    monkeypatch.setattr(skinny_gate_up, "gate_up_silu", lambda *a: calls.append(a[2:]) or real(*a))
    x = torch.randn(3, 64, device=DEVICE, dtype=layer.weight.dtype)
    got = layer.forward_silu_and_mul(x, SiluAndMul())
    torch.testing.assert_close(got, reference(x, layer.weight), **TOLERANCE[x.dtype])
    assert calls == ([(16, 32, 4, 2)] if DEVICE == "cuda" else [])
    assert skinny_gate_up.gate_up_tiles_for(torch.randn(20, 64, device=DEVICE, dtype=x.dtype), layer.weight) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 32])
def test_bf16_llama_shape_on_gpu(rows):
    """Llama-3.1-8B's gate_up (2 x 14336 x 4096) in bf16 at candidate tiles, and in a CUDA graph."""
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(2 * 14336, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    want = reference(x, w)
    for tiles in ((32, 128, 4, 4), (64, 64, 4, 3)):
        torch.testing.assert_close(skinny_gate_up.gate_up_silu(x, w, *tiles), want, **TOLERANCE[torch.bfloat16])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_gate_up.gate_up_silu(x, w, 32, 128, 4, 4)
    x.normal_()
    graph.replay()
    torch.testing.assert_close(out, reference(x, w), **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bundled_entries_on_gpu():
    """Every gate_up entry of the bundled table, at its bucket's fewest and most rows, in bf16."""
    entries = {k: v for k, v in skinny_gate_up.load_tiles().items() if k.startswith("gate_up/")}
    for key, tiles in entries.items():
        shape, bucket = key.removeprefix("gate_up/").split("/m")
        n, k = map(int, shape.split("x"))
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for rows in (int(bucket) - 15, int(bucket)):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(skinny_gate_up.gate_up_silu(x, w, *tiles), reference(x, w),
                                       **TOLERANCE[torch.bfloat16])
