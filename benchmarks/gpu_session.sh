#!/usr/bin/env bash
# One device session: GPU tests, then benchmarks; every log lands in $OUT.
# Usage (on the GPU machine, repo root): bash benchmarks/gpu_session.sh "<step> <step> ..."
#   setup           the carried .whl wheels and the package-dir links; in every call (the tree is
#                   re-synced between calls)
#   tables-base / tables-new   swap in the tile tables carried in .base/, then back: a same-run baseline
#   take-tables     the tables a tune step wrote to $OUT, into the tree
#   pack            every log into $OUT/logs.tar.gz (at most 8 files of $OUT come back); put it last
#   kernel-tests    the Triton kernels' bf16 GPU tests
#   tests-one       one GPU: HF parity with Triton attention, graphs vs eager, kernels
#   tests           2+ GPUs
#   gemm, tune-gemm, tune-gate-up   the step's matmuls alone; their tune; the fused gate_up's alone
#   moe-kernels     one MoE layer, every path
#   tune-moe-decode the router's one launch, then the MoE tiles (aligned and per-pair) at 1 and 4
#                   tokens, into $OUT (try a table with STRATA_MOE_TILES=)
#   tune-moe-pairs  only the per-pair layout, against the table's entries: minutes less
#   decode-tp1, decode-qwen, decode-moe (Qwen3-30B-A3B), decode-tp2, decode-tp4, decode-pp2
#   profile-b1, profile-b32, profile-moe-b1   GPU time per decode step by kernel
#   hf, tput-tp1, tput-tp2, tput-pp2, kernels, tune, moe-tp, moe-ep, moe-ep-a2a
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 RAY_USAGE_STATS_ENABLED=0
export RAY_DEDUP_LOGS=0 PYTHONPATH=$PWD:/tmp/site
B="python3 benchmarks/bench_engine.py"
J="--json-out $OUT/results.jsonl"
TPUT="--num-prompts ${NUM_PROMPTS:-1000} --input-len 1024 --output-len 128"
# TAG=-base names a step's log apart (decode-moe-base.log), for a same-run baseline; DECODE_ARGS
# (e.g. "--decode-steps 128 --decode-repeats 9") and DECODE_BATCHES reach decode-moe's and decode-tp1's
# bench_engine.
run() { local name=$1${TAG:-} limit=$2; shift 2; echo "=== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1;
        echo "rc=$?"; grep -E "all matmuls|decode batch|throughput:|TTFT|HF generate|passed|failed|Error|KV cache size|Maximum concurrency|GPU time per|engine, batch" "$OUT/$name.log" | head -20; }
TABLES="moe_tiles.json router_tiles.json skinny_tiles.json"
for step in $1; do
  case $step in
    setup)      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                  --target /tmp/site .whl/*.whl >/dev/null
                for d in app actors model placement; do ln -sfn ../$d strata/$d; done ;;
    tables-base) mkdir -p /tmp/tables-new  # the tables as they were before this change (carried in .base/)
                for t in $TABLES; do cp -n model/kernels/$t /tmp/tables-new/; cp .base/$t model/kernels/; done ;;
    tables-new) cp /tmp/tables-new/*.json model/kernels/ ;;
    tests-one)  run tests-one ${TESTS_LIMIT:-400} python3 -m pytest -m gpu -q tests/test_gpu_one.py \
                  tests/test_input_buffers.py tests/test_sampler.py tests/test_fused_ops.py \
                  tests/test_triton_attention.py ${TESTS_K:+-k "$TESTS_K"} ;;
    decode-qwen) run decode-qwen2 150 $B --shape qwen2-7b --tp 1 --backend mp --decode-batches 1,32 $J
                run decode-qwen3 150 $B --shape qwen3-8b --tp 1 --backend mp --decode-batches 1,32 $J ;;
    kernels)    run kernels 200 sh -c "python3 benchmarks/bench_attention.py && python3 benchmarks/bench_fused_ops.py" ;;
    gemm)       run gemm 120 python3 benchmarks/bench_gemm.py --shape llama-3.1-8b --batches 1,32 ;;
    tune-gemm)  run tune-gemm 550 python3 benchmarks/bench_gemm.py --tune --out "$OUT/skinny_tiles.json" ;;
    tune-gate-up) run tune-gate-up ${TUNE_LIMIT:-300} python3 benchmarks/bench_gemm.py --tune --only gate_up \
                  --tune-shapes ${TUNE_SHAPES:-llama-3.1-8b,qwen2-7b,qwen3-8b} --out "$OUT/skinny_tiles.json" ;;
    moe-kernels) run moe-kernels 300 python3 benchmarks/bench_moe.py ;;
    tune-moe-decode) cp -n model/kernels/moe_tiles.json model/kernels/router_tiles.json "$OUT/"  # merged into
                run tune-moe-decode ${TUNE_LIMIT:-400} python3 benchmarks/bench_moe.py --tune --shapes qwen3-30b-a3b \
                  --tokens ${TUNE_TOKENS:-1,4} --iters 20 --out "$OUT/moe_tiles.json" --router-out "$OUT/router_tiles.json" ;;
    tune-moe-pairs) cp -n model/kernels/moe_tiles.json "$OUT/"
                run tune-moe-pairs ${TUNE_LIMIT:-200} python3 benchmarks/bench_moe.py --tune --pairs-only \
                  --shapes qwen3-30b-a3b --tokens ${TUNE_TOKENS:-1} --iters 20 --out "$OUT/moe_tiles.json" ;;
    pack)       (cd "$OUT" && ls *.log >/dev/null 2>&1 && tar -czf logs.tar.gz --remove-files *.log) ;;  # 8 files come back
    take-tables) for t in $TABLES; do if [ -f "$OUT/$t" ]; then cp "$OUT/$t" model/kernels/; fi; done ;;  # what a tune step wrote
    kernel-tests) run kernel-tests ${TESTS_LIMIT:-170} python3 -m pytest -m gpu -q tests/test_fused_moe_kernels.py \
                  tests/test_moe_route_fused.py tests/test_skinny_gate_up.py tests/test_skinny_matmul.py \
                  tests/test_triton_attention.py ;;
    tune)       run tune 500 python3 benchmarks/tune_attention.py --out "$OUT/attention_tiles.json" ;;
    tests)      run tests ${TESTS_LIMIT:-300} python3 -m pytest -m gpu -q tests/test_gpu.py ${TESTS_K:+-k "$TESTS_K"} ;;
    decode-moe) run decode-moe 200 $B --shape qwen3-30b-a3b --tp 1 --backend mp --decode-batches ${DECODE_BATCHES:-1,32} \
                  ${DECODE_ARGS:-} $J ;;
    decode-tp1) run decode-tp1 150 $B --shape llama-3.1-8b --tp 1 --backend mp --decode-batches ${DECODE_BATCHES:-1,32} \
                  --ttft ${DECODE_ARGS:-} $J ;;
    profile-b1) run profile-b1 200 python3 benchmarks/profile_decode.py --num-prompts 0 --profile-batch 1 ;;
    profile-b32) run profile-b32 200 python3 benchmarks/profile_decode.py --num-prompts 0 --profile-batch 32 ;;
    profile-moe-b1) run profile-moe-b1 200 python3 benchmarks/profile_decode.py --shape qwen3-30b-a3b --num-prompts 0 \
                  --profile-batch 1 ;;
    decode-tp2) run decode-tp2 150 $B --shape llama-3.1-8b --tp 2 --decode-batches 1,32 $J ;;
    decode-tp4) run decode-tp4 150 $B --shape llama-3.1-8b --tp 4 --decode-batches 1,32 $J ;;
    decode-pp2) run decode-pp2 150 $B --shape llama-3.1-8b --pp 2 --decode-batches 1,32 $J ;;
    hf)         run hf 150 python3 benchmarks/hf_baseline.py --shape llama-3.1-8b --batches 1,32 ;;
    tput-tp1)   run tput-tp1 ${TPUT_LIMIT:-400} $B --shape llama-3.1-8b --tp 1 --backend mp $TPUT $J ;;
    tput-tp2)   run tput-tp2 ${TPUT_LIMIT:-400} $B --shape llama-3.1-8b --tp 2 $TPUT $J ;;
    tput-pp2)   run tput-pp2 ${TPUT_LIMIT:-400} $B --shape llama-3.1-8b --pp 2 $TPUT $J ;;
    moe-tp)     run moe-tp 300 $B --shape qwen3-30b-a3b --tp 2 --decode-batches 1,32 $TPUT $J ;;
    moe-ep)     run moe-ep 300 $B --shape qwen3-30b-a3b --tp 2 --ep --decode-batches 1,32 $TPUT $J ;;
    moe-ep-a2a) run moe-ep-a2a 300 $B --shape qwen3-30b-a3b --tp 2 --ep --ep-dispatch alltoall --decode-batches 1,32 $TPUT $J ;;
  esac
done
