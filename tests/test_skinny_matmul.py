"""The decode-sized Triton matmul (model/kernels/skinny_matmul.py) against torch's, under Triton's
interpreter on CPU (float32 / float16) and compiled on a GPU; and which products take it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: kernels run on CPU
pytest.importorskip("triton")

from strata.model.kernels import skinny_matmul as skinny  # noqa: E402
from strata.model.kernels.split_scratch import SplitScratch  # noqa: E402
from strata.model.layers.linear import linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,n,k,tiles", [
    (1, 96, 200, (32, 64, 4, 2)),    # N and K not multiples of their tiles
    (5, 64, 128, (16, 128, 4, 3)),
    (17, 48, 96, (16, 32, 2, 2)),    # the 32-row bucket
    (32, 40, 64, (32, 64, 4, 2)),
])
def test_matches_torch(rows, n, k, tiles, dtype):
    torch.manual_seed(rows)
    x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5
    got = skinny.skinny_matmul(x, w, *tiles)
    assert got.shape == (rows, n) and got.dtype == dtype
    torch.testing.assert_close(got, torch.nn.functional.linear(x.float(), w.float()).to(dtype), **TOLERANCE[dtype])


def test_strided_rows_and_bad_shapes():
    x = torch.randn(4, 2 * 64, device=DEVICE)[:, ::2]  # a strided view: read through its strides
    w = torch.randn(32, 64, device=DEVICE)
    torch.testing.assert_close(skinny.skinny_matmul(x, w, 16, 32, 2, 2), x @ w.T, **TOLERANCE[torch.float32])
    with pytest.raises(ValueError, match="M <= 32"):
        skinny.skinny_matmul(torch.randn(33, 64, device=DEVICE), w, 16, 32, 2, 2)
    with pytest.raises(ValueError, match="weight"):
        skinny.skinny_matmul(torch.randn(2, 63, device=DEVICE), w, 16, 32, 2, 2)


def test_only_tuned_16_bit_cuda_products_take_the_kernel(monkeypatch, tmp_path):
    table = tmp_path / "tiles.json"
    table.write_text('{"_about": "notes", "32x64/m16": [16, 32, 2, 2]}')
    tiles = skinny.load_tiles(str(table))
    assert tiles == {"32x64/m16": (16, 32, 2, 2)}
    assert skinny.load_tiles(str(tmp_path / "missing.json")) == {}  # unreadable: everything on cuBLAS
    monkeypatch.setattr(skinny, "load_tiles", lambda: tiles)
    w = torch.empty(32, 64, dtype=torch.float16)
    assert skinny.tiles_for(torch.empty(3, 64, dtype=torch.float16), w) is None  # on CPU: torch's matmul
    if torch.cuda.is_available():
        w = w.cuda()
        assert skinny.tiles_for(torch.empty(3, 64, dtype=torch.float16, device="cuda"), w) == (16, 32, 2, 2)
        assert skinny.tiles_for(torch.empty(20, 64, dtype=torch.float16, device="cuda"), w) is None  # untuned bucket
        assert skinny.tiles_for(torch.empty(3, 64, device="cuda"), w.float()) is None  # float32
    x, w, b = torch.randn(3, 64, device=DEVICE), torch.randn(32, 64, device=DEVICE), torch.ones(32, device=DEVICE)
    torch.testing.assert_close(linear(x, w, b), x @ w.T + 1, **TOLERANCE[torch.float32])


def test_a_malformed_entry_is_reported_once_and_left_untuned(caplog):
    with caplog.at_level("WARNING"):
        assert skinny.entry_of_length((16, 32, 4), (4, 5), "32x64/m16", "test tiles") is None
        assert skinny.entry_of_length((16, 32, 4), (4, 5), "32x64/m16", "test tiles") is None
        assert skinny.entry_of_length((16, 32, 4, 3), (4, 5), "32x64/m16", "test tiles") == (16, 32, 4, 3)
        assert skinny.entry_of_length(None, (4, 5), "32x64/m16", "test tiles") is None
    warned = [r.getMessage() for r in caplog.records if "test tiles" in r.getMessage()]
    assert len(warned) == 1 and "32x64/m16" in warned[0] and "wants 4 or 5" in warned[0]


def test_bundled_table_reads():
    assert all(len(v) in (4, 5) for v in skinny.load_tiles().values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tuned_shapes_match_cublas_in_bfloat16():
    """Every product the bundled table sends to the kernel, at its bucket's fewest and most rows,
    within bf16 rounding of cuBLAS (both accumulate in float32)."""
    for key, tiles in skinny.load_tiles().items():
        if key.startswith("gate_up/"):  # the fused gate_up's entries: test_skinny_gate_up checks them
            continue
        shape, bucket = key.split("/m")
        n, k = map(int, shape.split("x"))
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for rows in (int(bucket) - 15, int(bucket)):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            torch.testing.assert_close(skinny.skinny_matmul(x, w, *tiles), torch.nn.functional.linear(x, w),
                                       atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("rows,n,k,tiles", [
    (1, 96, 200, (32, 64, 4, 2, 2)),     # K's last split shorter than the others
    (3, 48, 512, (16, 64, 2, 2, 4)),
    (20, 40, 96, (32, 32, 2, 2, 8)),     # more splits asked than K has tiles: 3 run
])
def test_split_k_matches_torch_and_rearms_its_counters(rows, n, k, tiles, dtype):
    torch.manual_seed(k)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5
    for _ in range(2):  # the second launch finds the counters the first left at zero
        x = torch.randn(rows, k, dtype=dtype, device=DEVICE)
        got = skinny.skinny_matmul(x, w, *tiles)
        torch.testing.assert_close(got, torch.nn.functional.linear(x.float(), w.float()).to(dtype), **TOLERANCE[dtype])
    assert not skinny._scratch.buffers[torch.int32, torch.device(DEVICE)].any()
    with pytest.raises(ValueError, match="split"):
        skinny.skinny_matmul(x, w, 16, 32, 2, 2, 0)


def test_split_scratch_grows_and_keeps_what_graphs_captured():
    """A larger split product after a smaller one gets a larger buffer; the outgrown one is kept
    (a CUDA graph captured with it still writes there), and both products stay right."""
    scratch = SplitScratch()
    dev = torch.device(DEVICE)
    small, _ = scratch.get(dev, 64, 4)
    assert scratch.get(dev, 32, 2)[0] is small  # fits: reused, the same address
    large, counters = scratch.get(dev, 100, 9)
    assert large.numel() >= 128 and counters.numel() >= 9 and any(r is small for r in scratch.retired)
    assert not counters.any()
