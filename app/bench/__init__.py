"""`strata bench latency | throughput | serve`: vLLM's benchmark commands, over Strata."""
