"""`strata bench latency | throughput | serve`: vLLM's benchmark commands, over Strata.

cli.py builds the parser tree; engine_args.py borrows `strata serve`'s engine flags for the two
offline commands; datasets.py draws the random token-id prompts; latency.py and throughput.py
measure an in-process `LLM`; serve.py loads a running server, one request at a time through
serve_request.py, summarised by serve_metrics.py; stats.py holds the percentiles and flags.py
the value types and shared flags.
"""
