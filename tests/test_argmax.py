"""The greedy pick's Triton kernel (model/kernels/argmax.py) against torch's argmax, under Triton's
interpreter on CPU and compiled on a GPU: the same ids, ties going to the lowest."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.model.kernels.argmax import CHUNK, argmax_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("vocab", [7, CHUNK, 2 * CHUNK + 5])
def test_matches_torch_with_ties(vocab, dtype):
    torch.manual_seed(vocab)
    x = torch.randn(6, vocab, device=DEVICE).to(dtype)
    top = x.float().max().item() + 1
    x[1, :] = 0  # all equal: id 0
    x[2, vocab // 2] = x[2, -1] = top  # a tie, possibly across tiles: the first
    x[3, :] = float("-inf")
    x[4, -1] = top  # the last column of the last, partial tile
    x[5, 0] = top
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


def test_rows_read_through_their_stride_and_bad_layouts_are_refused():
    wide = torch.randn(3, 2 * CHUNK + 40, device=DEVICE)
    rows = wide[:, 10:CHUNK + 30]  # rows start apart by the wide stride
    assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))
    assert argmax_rows(torch.empty(0, 9, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="contiguous rows"):
        argmax_rows(wide.T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_vocab_sized_rows_on_the_gpu():
    for rows, vocab in ((1, 128_256), (32, 151_936)):
        x = torch.randn(rows, vocab, device="cuda")
        x[0, 100_000] = x[0, 99_999] = x.max() + 1
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
