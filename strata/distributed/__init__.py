"""The floor below strata.model: the rank layout, process groups, the byte channel and the wire types.

    rank_layout     rank <-> (pp_rank, tp_rank), the one place that owns it
    sockets         listeners bound to one address
    process_groups  torch.distributed bring-up and the tp / pp / control groups
    channel         bytes and msgpack between ranks
    step_plan       the wire types: StepPlan, StepResult, SamplerOptions

It imports only the records at strata's root (strata.config, strata.sampling_params, ...).
"""
