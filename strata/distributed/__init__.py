"""The floor below strata.model: the rank layout, process groups, the byte channel and the wire types.

    rank_layout     rank <-> (pp_rank, tp_rank), the one place that owns it
    sockets         listeners bound to one address
    process_groups  torch.distributed bring-up and the tp / pp / control groups
    channel         bytes and msgpack between ranks
    step_plan       the wire types: StepPlan, PlanBuilder (packed int arrays)
    step_result     StepResult, SampledResult, PromptLogprobs
    sampler_options SamplerOptions (what the sampling rank keeps per sequence)

The plan ring (one writer, every local rank reads each step plan) and its relay to other nodes:

    shm_ring        the ring as a whole: what it is, its modules, their public names re-exported
    ring_layout     the segment's shared words, its geometry and the crc framing of a chunk
    ring_segment    creating, mapping and unlinking the shared-memory segment
    ring_liveness   peers by pid and start time, and how waits poll
    ring_errors     RingError and its kinds (RingClosed, RingAborted, PeerDied, RingTimeout)
    ring_writer     RingWriter
    ring_reader     RingReader
    plan_relay      the relay as a whole: node 0's ring carried to the other nodes over TCP
    relay_wire      its frames, RelayError and socket settings
    relay_hub       node 0's end: PlanHub and a Forwarder per node
    relay_node      every other node's end: NodeRelay

It imports only the records at strata's root (strata.config, strata.sampling_params, ...).
"""
