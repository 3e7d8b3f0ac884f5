"""The fused MoE kernels and the skinny split-K matmul compile for an H100/H200 (sm_90, bf16)
on a machine without a GPU.

Triton's interpreter accepts code the compiler rejects (and the reverse), so the CPU tests alone do
not say the kernels build. Triton compiles to a cubin with no device present; it needs the kernels
defined without TRITON_INTERPRET, which this session has set, so the compiling runs in a child
process: this file, run as a script.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def compile_all() -> list[str]:
    """Compiles every kernel at the default tiles; returns one line per kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from strata.model.kernels import fused_moe, moe_align, moe_pairs, moe_route, moe_sum, skinny_gate_up, skinny_matmul
    from strata.model.kernels.moe_tuning import default_tiles

    done = []

    def build(fn, types: dict[str, str], consts: dict, **options) -> None:
        sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=options)
        done.append(f"{fn.__name__} {consts}: {kernel.metadata.shared} bytes shared")

    i32, i64, bf16 = "*i32", "*i64", "*bf16"
    align = dict(ids_ptr=i64, counts_ptr=i32, base_ptr=i32, expert_counts_ptr=i64, sorted_ids_ptr=i32,
                 tile_experts_ptr=i32, used_tiles_ptr=i32, ends_ptr=i32)
    for one_chunk in (True, False):
        build(moe_align._layout_kernel, align, dict(ONE_CHUNK=one_chunk, COUNT_LOAD=True, BLOCK_M=16, E_PAD=128,
                                                    CHUNK=128, BLOCK=64))
    build(moe_align._count_kernel, align, dict(CHUNK=128, E_PAD=128))
    build(moe_align._scatter_kernel, align, dict(CHUNK=128, E_PAD=128))
    build(moe_sum._sum_topk_kernel, dict(y_ptr=bf16, ids_ptr=i64, out_ptr=bf16), dict(T_PAD=1, K_PAD=8, BLOCK=512),
          num_warps=4)
    gemm = dict(a_ptr=bf16, b_ptr=bf16, c_ptr=bf16, weights_ptr="*fp32", sorted_ids_ptr=i32,
                tile_experts_ptr=i32, used_tiles_ptr=i32)
    for tiles in {default_tiles(1, 8, 128), default_tiles(4096, 8, 128)}:
        for gate_up in (True, False):
            build(fused_moe._grouped_gemm_kernel, gemm,
                  dict(GATE_UP=gate_up, MUL_WEIGHT=not gate_up, PRECISE=True, DOT_PRECISION="tf32",
                       BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=8),
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    pairs = dict(a_ptr=bf16, b_ptr=bf16, c_ptr=bf16, out_ptr=bf16, weights_ptr="*fp32", ids_ptr=i64,
                 counts_ptr=i64, arrivals_ptr=i32)
    for gate_up in (True, False):  # gate_up counts the load; down sums the top k in its last program
        build(moe_pairs._pair_gemm_kernel, pairs,
              dict(GATE_UP=gate_up, SUM_TOPK=not gate_up, COUNT=gate_up, PRECISE=True, DOT_PRECISION="tf32",
                   BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, T_PAD=2, K_PAD=8), num_warps=4,
              num_stages=5)
    route = dict(x_ptr=bf16, w_ptr=bf16, weights_ptr="*fp32", ids_ptr=i64, partial_ptr="*fp32", arrivals_ptr=i32)
    for rows, split in ((16, 4), (32, 1)):  # the router's matmul and routing in one launch
        build(moe_route._hidden_route_kernel, route,
              dict(TOP_K=8, SIGMOID=False, RENORMALIZE=True, E_PAD=128, K_PAD=8, BLOCK_M=rows, BLOCK_E=16,
                   BLOCK_K=256, SPLIT=split), num_warps=4)
    build(skinny_gate_up._gate_up_kernel, dict(x_ptr=bf16, w_ptr=bf16, y_ptr=bf16),  # the dense MLP's, same tile
          dict(PRECISE=True, DOT_PRECISION="tf32", BLOCK_M=16, BLOCK_N=32, BLOCK_K=128), num_warps=4, num_stages=4)
    build(skinny_matmul._skinny_kernel, dict(x_ptr=bf16, w_ptr=bf16, y_ptr=bf16, partial_ptr="*fp32",
                                             arrivals_ptr=i32),  # split-K: partials meet in the last split
          dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT=2), num_warps=4, num_stages=4)
    return done


@pytest.mark.slow
def test_kernels_compile_for_sm90() -> None:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("bytes shared") == 15, run.stdout


if __name__ == "__main__":
    print("\n".join(compile_all()))
