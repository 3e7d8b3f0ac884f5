"""`strata bench latency | throughput | serve` on CPU: the flags (serve's engine flags, reused,
and clear errors for bad values), the random dataset, the statistics, latency and throughput
end to end on dummy weights of the tiny-llama shape, and the serving benchmark against a live
HTTP server in this process (the real app over a FakeEngine): its result block and JSON, failed
requests counted rather than fatal, and a missing server, model or key failing at once."""

from __future__ import annotations

import json
import threading
import time

import pytest

from benchmarks.shapes import SHAPES, write_shape
from strata.app.cli import build_parser, main
from tests.server_fixtures import FakeEngine, free_port

pytestmark = pytest.mark.timeout(180)

API_KEY = "bench-key"
MAX_MODEL_LEN = 64
VOCAB = SHAPES["tiny-llama"]["vocab_size"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A config-only model directory of the tiny-llama shape (for load_format dummy)."""
    return write_shape("tiny-llama", str(tmp_path_factory.mktemp("bench")))


def offline(tiny_dir: str) -> list[str]:
    return ["--model", tiny_dir, "--load-format", "dummy", "--skip-tokenizer-init",
            "--distributed-executor-backend", "mp", "--max-model-len", "256", "--disable-tqdm"]


# ---- flags ----

def test_offline_commands_take_serves_engine_flags():
    import argparse

    from strata.app.bench.engine_args import engine_config
    from strata.app.serve_cli import add_engine_args

    engine_only = argparse.ArgumentParser()
    add_engine_args(engine_only)
    wanted = set(vars(engine_only.parse_args([])))  # every engine flag `strata serve` takes
    for command in ("latency", "throughput"):
        args = build_parser().parse_args(["bench", command, "--model", "m", "-tp", "2", "-pp", "2",
                                          "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                                          "--dtype", "bfloat16", "--enforce-eager", "--gpu-memory-utilization", "0.5",
                                          "--distributed-executor-backend", "mp"])
        assert wanted <= set(vars(args))
        config = engine_config(args)
        assert (config.model, config.tensor_parallel_size, config.pipeline_parallel_size) == ("m", 2, 2)
        assert (config.max_num_seqs, config.max_num_batched_tokens, config.dtype) == (8, 512, "bfloat16")
        assert config.enforce_eager and config.gpu_memory_utilization == 0.5
        assert config.distributed_executor_backend == "mp" and not config.skip_tokenizer_init


@pytest.mark.parametrize("argv, flag", [
    (["latency", "--num-iters", "0"], "--num-iters"),
    (["latency", "--batch-size", "x"], "--batch-size"),
    (["throughput", "--random-range-ratio", "1"], "--random-range-ratio"),
    (["throughput", "--dataset-name", "sharegpt"], "--dataset-name"),
    (["serve", "--request-rate", "0"], "--request-rate"),
    (["serve", "--max-concurrency", "0"], "--max-concurrency"),
    (["serve", "--endpoint", "/v1/chat/completions"], "--endpoint"),
    (["serve", "--percentile-metrics", "ttft,speed"], "--percentile-metrics"),
    (["serve", "--metric-percentiles", "50,101"], "--metric-percentiles"),
])
def test_bad_flag_values_are_argparse_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", *argv])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_engine_flags_serve_refuses_fail_in_serves_words(capsys):
    assert main(["bench", "latency", "--block-size", "3"]) == 2
    assert "strata bench latency: error: --block-size" in capsys.readouterr().err


# ---- dataset and statistics ----

def test_random_dataset_is_seeded_and_within_the_vocabulary():
    from strata.app.bench.datasets import random_requests

    exact = random_requests(5, 16, 8, vocab_size=50, seed=1)
    assert [(r.prompt_len, r.output_len) for r in exact] == [(16, 8)] * 5
    assert all(0 <= t < 50 for r in exact for t in r.prompt_token_ids)
    assert exact == random_requests(5, 16, 8, vocab_size=50, seed=1) != random_requests(5, 16, 8, 50, seed=2)
    varied = random_requests(200, 100, 10, vocab_size=VOCAB, range_ratio=0.5, seed=0)
    assert {r.prompt_len for r in varied} <= set(range(50, 151)) and len({r.prompt_len for r in varied}) > 20
    assert {r.output_len for r in varied} <= set(range(5, 16))
    with pytest.raises(ValueError, match="range_ratio"):
        random_requests(1, 4, 4, 10, range_ratio=1.0)


def test_percentiles_and_summaries():
    from strata.app.bench.stats import percentiles, summarize

    values = [float(v) for v in range(1, 101)]
    assert percentiles(values, (50, 99)) == pytest.approx({50: 50.5, 99: 99.01})
    s = summarize(values, (25,))
    assert (s.mean, s.median, s.percentiles) == (50.5, 50.5, {25: pytest.approx(25.75)})
    assert summarize([], (99,)) == summarize([], (99,)) and summarize([], (99,)).percentiles == {99: 0.0}


def test_arrival_times_all_at_once_or_poisson():
    from strata.app.bench.serve import arrival_offsets

    assert arrival_offsets(4, float("inf"), 1.0, 0) == [0.0] * 4
    poisson = arrival_offsets(2000, 50.0, 1.0, seed=3)
    assert poisson[0] == 0.0 and poisson == sorted(poisson) and poisson == arrival_offsets(2000, 50.0, 1.0, seed=3)
    assert poisson[-1] / 1999 == pytest.approx(1 / 50, rel=0.1)


# ---- latency and throughput, offline ----

def test_latency_prints_vllms_lines_and_json(tiny_dir, tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(["bench", "latency", *offline(tiny_dir), "--input-len", "8", "--output-len", "4", "--batch-size", "2",
               "--num-iters-warmup", "1", "--num-iters", "3", "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    record = json.loads(out.read_text())
    assert len(record["latencies"]) == 3 and all(v > 0 for v in record["latencies"])
    assert f"Avg latency: {record['avg_latency']:.6f} seconds" in printed
    assert list(record["percentiles"]) == ["10", "25", "50", "75", "90", "99"]
    for p in record["percentiles"]:
        assert f"{p}% percentile latency: " in printed


def test_throughput_counts_every_token(tiny_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    rc = main(["bench", "throughput", *offline(tiny_dir), "--input-len", "12", "--output-len", "5",
               "--num-prompts", "6", "--output-json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    record = json.loads(out.read_text())
    assert (record["num_requests"], record["total_prompt_tokens"], record["total_output_tokens"]) == (6, 72, 30)
    assert record["total_num_tokens"] == 102 and record["requests_per_second"] > 0
    assert (f"Throughput: {record['requests_per_second']:.2f} requests/s, {record['tokens_per_second']:.2f} total "
            f"tokens/s, {record['output_tokens_per_second']:.2f} output tokens/s") in printed
    assert "Total num prompt tokens:  72" in printed and "Total num output tokens:  30" in printed


def test_an_engine_that_cannot_run_the_prompts_fails_in_one_line(tiny_dir, capsys):
    rc = main(["bench", "latency", *offline(tiny_dir), "--input-len", "300", "--output-len", "4",
               "--batch-size", "1", "--num-iters-warmup", "0", "--num-iters", "1"])
    assert rc == 1
    assert "strata bench latency: error: prompt 0: " in capsys.readouterr().err


# ---- serve, against a live server in this process ----

@pytest.fixture(scope="module")
def fake_server(tiny_dir):
    """The real OpenAI app under uvicorn, over a FakeEngine with the tiny shape's vocabulary and
    no tokenizer (token-id prompts only), serving the model under its directory's name."""
    import uvicorn

    from strata.app.server.api import build_app
    from strata.app.server.settings import ServerSettings

    engine = FakeEngine(max_model_len=MAX_MODEL_LEN, vocab_size=VOCAB, max_num_seqs=8, step_s=0.002)
    settings = ServerSettings(served_model_name=[tiny_dir], api_key=API_KEY, uvicorn_log_level="warning")
    server = uvicorn.Server(uvicorn.Config(build_app(engine, settings), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the test server did not start"
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(10)


def bench_serve(url: str, *extra: str) -> int:
    return main(["bench", "serve", "--base-url", url, "--api-key", API_KEY, "--disable-tqdm", *extra])


def test_serve_prints_the_result_block_and_json(fake_server, tiny_dir, tmp_path, capsys):
    engine, url = fake_server
    out = tmp_path / "serve.json"
    rc = bench_serve(url, "--num-prompts", "12", "--input-len", "10", "--output-len", "6", "--request-rate", "400",
                     "--max-concurrency", "4", "--output-json", str(out))
    printed = capsys.readouterr().out
    assert rc == 0
    lines = printed[printed.index("=" * 12):].splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============" and lines[-1] == "=" * 50
    for label, value in [("Successful requests:", "12"), ("Failed requests:", "0"),
                         ("Maximum request concurrency:", "4"), ("Total input tokens:", "120"),
                         ("Total generated tokens:", "72")]:
        assert f"{label:<40} {value:<10}" in lines
    for section in ("Time to First Token", "Time per Output Token (excl. 1st token)", "Inter-token Latency"):
        assert section.center(50, "-") in lines
    for metric in ("TTFT", "TPOT", "ITL"):
        assert any(line.startswith(f"P99 {metric} (ms):") for line in lines)
    record = json.loads(out.read_text())
    assert (record["completed"], record["failed"], record["total_output_tokens"]) == (12, 0, 72)
    assert record["model_id"] == tiny_dir and record["request_rate"] == 400  # the first of /v1/models
    assert 0 < record["mean_ttft_ms"] <= record["mean_e2el_ms"] and record["mean_tpot_ms"] > 0
    assert all(len(itl) == 5 for itl in record["itls"])  # one chunk per token: 6 arrivals, 5 gaps
    sent = engine.requests[-12:]
    assert all(r.params.ignore_eos and r.params.max_tokens == 6 and len(r.prompt_token_ids) == 10 for r in sent)


def test_serve_counts_failed_requests_without_stopping(fake_server, tmp_path, capsys):
    from strata.app.bench.datasets import random_requests

    _, url = fake_server
    args = ["--num-prompts", "20", "--input-len", "40", "--output-len", "20", "--random-range-ratio", "0.5",
            "--seed", "7", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,90"]
    too_long = sum(r.prompt_len + r.output_len > MAX_MODEL_LEN for r in random_requests(20, 40, 20, VOCAB, 0.5, 7))
    assert 0 < too_long < 20
    rc = bench_serve(url, *args, "--output-json", str(tmp_path / "serve.json"))
    assert json.loads((tmp_path / "serve.json").read_text())["request_rate"] == "inf"  # strict JSON
    captured = capsys.readouterr()
    assert rc == 0
    assert f"{'Successful requests:':<40} {20 - too_long:<10}" in captured.out
    assert f"{'Failed requests:':<40} {too_long:<10}" in captured.out
    assert "P90 E2EL (ms):" in captured.out and "TPOT" not in captured.out
    assert f"{too_long} of 20 requests failed" in captured.err
    assert f"x HTTP 400: This model's maximum context length is {MAX_MODEL_LEN} tokens" in captured.err


def test_serve_where_every_request_fails_exits_1(fake_server, capsys):
    engine, url = fake_server
    engine.refuse = "the engine refuses everything"
    try:
        rc = bench_serve(url, "--num-prompts", "3", "--input-len", "4", "--output-len", "2")
    finally:
        engine.refuse = None
    captured = capsys.readouterr()
    assert rc == 1 and f"{'Failed requests:':<40} {3:<10}" in captured.out
    assert "3 x HTTP 400: the engine refuses everything" in captured.err


@pytest.mark.parametrize("extra, message", [
    (["--model", "other"], "does not serve 'other'"),
    (["--api-key", "wrong"], "answered 401"),
])
def test_serve_fails_at_once_for_a_wrong_model_or_key(fake_server, extra, message, capsys):
    engine, url = fake_server
    before = len(engine.requests)
    assert bench_serve(url, "--num-prompts", "2", *extra) == 1
    assert message in capsys.readouterr().err and len(engine.requests) == before


def test_serve_without_a_server_starts_nothing_and_says_so(capsys):
    port = free_port()
    assert main(["bench", "serve", "--port", str(port), "--num-prompts", "2"]) == 1
    err = capsys.readouterr().err
    assert f"no server answers at http://127.0.0.1:{port}" in err and "strata serve" in err


def test_serve_needs_the_vocabulary_of_the_served_model(tmp_path):
    from strata.app.bench.flags import BenchError
    from strata.app.bench.serve import vocab_size_of

    assert vocab_size_of("renamed", write_shape("tiny-llama", str(tmp_path))) == VOCAB  # --tokenizer DIR
    with pytest.raises(BenchError, match="cannot tell the vocabulary size of '/no/such/model'.*--tokenizer"):
        vocab_size_of("/no/such/model", None)
