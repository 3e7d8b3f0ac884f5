"""A step launched on the device whose sampled tokens are not read yet (async scheduling).

The sampling rank launches a step's forward and draws, then hands back a PendingStep at once; the
engine schedules the next step meanwhile and calls `result()` when it needs the tokens. Reading
them waits for the device only if it is still busy, then records each token where the rank keeps
it: the sequence's sampling state (`output_token_ids`) and the persistent batch, whose tokens hold
a PENDING_TOKEN placeholder wherever a later plan already continued the sequence.
"""

from __future__ import annotations

import time

from strata.actors.worker.persistent_batch import PersistentBatch
from strata.distributed.step_result import SampledResult, StepResult
from strata.model.sampler import PendingSample, SequenceSamplingState


class PendingStep:
    def __init__(self, base: StepResult, started: float, sample: PendingSample | None = None,
                 seq_ids: list[int] | None = None, positions: list[int] | None = None,
                 batch: PersistentBatch | None = None):
        """`base`: the step's result without its sampled tokens (prompt logprobs are already in it);
        `seq_ids[i]` drew the token `sample` row i holds, which sits at `positions[i]`."""
        self.base = base
        self._started = started
        self._sample = sample
        self._seq_ids = seq_ids or []
        self._positions = positions or []
        self._batch = batch
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        """The step's result (read once; later calls return the same)."""
        if self._result is not None:
            return self._result
        result = self.base
        if self._sample is not None:
            tokens = self._sample.tokens()
            states: list[SequenceSamplingState] = self._sample.states
            for seq_id, state, tok in zip(self._seq_ids, states, tokens, strict=True):
                state.output_token_ids.append(tok.token_id)
                result.sampled[seq_id] = SampledResult(tok.token_id, tok.logprob, tok.rank, tok.top_logprobs)
            if self._batch is not None:
                self._batch.fill_pending(self._seq_ids, self._positions, [t.token_id for t in tokens])
        result.step_seconds = time.time() - self._started
        self._result = result
        return result
