"""The runtime: the engine core, the rank workers, node plumbing, and the executors that launch ranks."""
