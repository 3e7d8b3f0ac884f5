"""The rank: one model shard, its KV cache and its persistent state, running step plans."""
