"""One-off: where a batch-1 decode step spends its time (torch.profiler, CPU self time)."""
import sys, tempfile, time
sys.path.insert(0, ".")
import torch
from benchmarks.shapes import write_shape
from strata import LLM, SamplingParams
with tempfile.TemporaryDirectory() as tmp:
    d = write_shape("llama-3.1-8b", tmp)
    llm = LLM(d, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", distributed_executor_backend="mp",
              max_model_len=2048, max_num_seqs=256, max_num_batched_tokens=8192)
    p = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(100, 228))}], p, use_tqdm=False)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([{"prompt_token_ids": list(range(100, 228))}], p, use_tqdm=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    prompts = [{"prompt_token_ids": [100 + (i * 7 + j) % 30000 for j in range(1024)]} for i in range(200)]
    t = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), use_tqdm=False)
    s = time.perf_counter() - t
    print(f"throughput: 200 prompts x (1024 in, 128 out) in {s:.1f} s: {200*1152/s:.0f} total tok/s")
    llm.shutdown()
