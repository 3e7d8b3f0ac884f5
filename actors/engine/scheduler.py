"""The scheduler: which sequences run in the next step, and how many tokens each computes.

Plain Python (no torch, no Ray), tested on CPU with made-up sampled tokens. It holds only its
two queues (waiting, running); the engine owns the map of sequences and hands the scheduler the
Sequence objects themselves.

It also knows what the ranks know: every scheduled chunk says what is new for them (the
sequence's announcement, the block ids and sampled tokens they have not been sent, whether a
preemption replaced its table), and every output lists the sequences finished since the last
one, so the engine's step plan (strata.distributed.step_plan) carries only changes. Its config,
chunks and outputs are records of their own (strata.actors.engine.scheduler_records).
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque

from strata.actors.engine.block_manager import BlockManager
from strata.actors.engine.scheduler_records import ScheduledChunk, SchedulerConfig, SchedulerOutput
from strata.actors.engine.sequence import Sequence, SequenceStatus
from strata.distributed.step_plan import PENDING_TOKEN


class Scheduler:
    """Continuous batching with chunked prefill and recompute preemption (vLLM v1 style).

    Each ``schedule()`` call plans one step under a budget of ``max_num_batched_tokens`` tokens:

    1. Running sequences, oldest first. Each gets ``min(tokens left to compute, budget left)``
       tokens: 1 when decoding, a chunk when its prompt is still being prefilled. Blocks are
       allocated for the scheduled tokens. When they cannot be, the newest running sequence that
       is not in flight is preempted (blocks freed, ``num_computed_tokens = 0``, status WAITING, to
       the front of the waiting queue; prompt and output so far are recomputed on readmission), and
       allocation is retried. If the sequence itself is the newest running one, it is preempted.
       If only in-flight sequences are newer, it sits this step out (keeping its blocks) rather
       than lose its cache to younger sequences: they become preemptible when their results return.
    2. Waiting sequences, FIFO, while budget and ``max_num_seqs`` allow. A long prompt is chunked
       to the budget left. A sequence whose blocks do not fit stays at the head of the queue
       (admissions never preempt, and nothing overtakes it). No admissions in a step where a
       running sequence was short of blocks.

    Sequences with ``in_flight`` set (a chunk scheduled, its result not yet passed to ``update``)
    are skipped, so the engine may call ``schedule()`` again before ``update()`` of an earlier
    output and keep several batches in flight (pipeline parallelism). With
    ``continue_in_flight`` (async scheduling) a sequence whose one in-flight chunk samples is
    scheduled again, for one token: the one that chunk samples, still unknown (a pending chunk,
    whose token the sampling rank feeds on its device). Not when that token is sure to end it
    (max_tokens, max_model_len); a stop token found later makes the pending chunk wasted work,
    whose result is dropped. In-flight sequences are never preempted: a pending chunk that
    finds no block sits the step out. ``finish()`` may free an in-flight sequence's blocks; that is safe as long as
    the ranks run batches in the order they were scheduled (a later batch that reuses a block
    writes it after the earlier one did).

    Progress: when blocks are short the oldest sequences keep theirs, so the oldest always
    progresses; any sequence fits alone, as the config checks max_model_len <= cache size.
    The engine checks stop conditions and ``max_model_len`` and calls ``finish()``; the scheduler
    only asserts that no chunk reaches past ``max_model_len`` tokens.

    Ownership: the scheduler keeps no map of sequences, only the queues. The engine keeps the one
    map (and gives every sequence a unique ``seq_id``) and passes the Sequence itself to ``add``
    and ``finish``. The scheduler keeps what the ranks were told of each sequence (see
    ``ScheduledChunk``), and the ids of finished sequences until an output carries them.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager | None = None) -> None:
        self.config = config
        if block_manager is None:
            block_manager = BlockManager(config.num_blocks, config.block_size)
        if (block_manager.num_blocks, block_manager.block_size) != (config.num_blocks, config.block_size):
            raise ValueError("block_manager does not match the config's num_blocks / block_size")
        self.block_manager = block_manager
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # sorted by arrival_order
        self._arrivals = itertools.count()
        self._finished_ids: list[int] = []  # announced, finished, not yet in an output

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running (in flight ones included)."""
        return bool(self._waiting or self._running)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back of the waiting queue and stamp its ``arrival_order``.
        A sequence is added once: one already added (queued or finished) raises ValueError."""
        if seq.arrival_order != -1:
            raise ValueError(f"sequence {seq.seq_id} was already added")
        if not 0 < seq.num_tokens <= self.config.max_model_len:
            raise ValueError(
                f"sequence {seq.seq_id} has {seq.num_tokens} tokens; "
                f"it needs 1 to max_model_len={self.config.max_model_len}"
            )
        seq.arrival_order = next(self._arrivals)
        seq.status = SequenceStatus.WAITING
        self._waiting.append(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End an added sequence: free its blocks and drop it from its queue (it may be in flight:
        see the class docstring). Finishing a finished sequence again is a no-op; one never added
        raises ValueError."""
        if not status.is_finished:
            raise ValueError(f"finish() needs a FINISHED_* status, got {status.name}")
        if seq.status.is_finished:
            return
        if seq.arrival_order == -1:
            raise ValueError(f"sequence {seq.seq_id} was never added")
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)
        if seq.announced:
            self._finished_ids.append(seq.seq_id)

    def schedule(self, max_seqs: int | None = None, continue_in_flight: bool = False) -> SchedulerOutput:
        """Plan the next step (see the class docstring). Marks every scheduled sequence in flight.

        ``max_seqs`` caps this step's sequences: with pipeline parallelism the engine splits the
        running sequences over several micro-batches, so that every stage has one to work on.
        ``continue_in_flight``: async scheduling (one step in flight): decoding sequences in it
        get a pending chunk each."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        short_of_blocks = False
        cap = max_seqs if max_seqs is not None else self.config.max_num_seqs

        # Indexing, not iteration: preemption removes entries from self._running. The loop runs
        # for every running sequence every step, so it is written for speed (locals, no calls
        # but allocate and _chunk when the blocks are there).
        running, chunks = self._running, out.chunks
        allocate, chunk_of = self.block_manager.allocate, self._chunk
        i = 0
        while i < len(running) and budget > 0 and len(chunks) < cap:
            seq = running[i]
            if seq.in_flight:
                if continue_in_flight and seq.in_flight == 1 and seq.pending_sample and self._continues(seq):
                    if allocate(seq, seq.num_in_flight_tokens + 1):
                        chunks.append(self._pending_chunk(seq))
                        budget -= 1
                    else:
                        short_of_blocks = True
                i += 1
                continue
            num_new = len(seq.prompt_token_ids) + len(seq.output_token_ids) - seq.num_computed_tokens
            if num_new <= 0:
                i += 1
                continue
            if num_new > budget:
                num_new = budget
            if allocate(seq, num_new) or self._make_room(seq, num_new, out):
                chunks.append(chunk_of(seq, num_new))
                budget -= num_new
            else:
                short_of_blocks = True
            if seq.status is SequenceStatus.RUNNING:  # else it preempted itself: i is the next one
                i += 1

        admit = not short_of_blocks and not out.preempted
        while (admit and self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs
               and len(out.chunks) < cap):
            seq = self._waiting[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, num_new):
                break  # FIFO: nothing overtakes the head of the queue
            self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self._running, seq, key=lambda s: s.arrival_order)
            out.chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        if out.chunks and self._finished_ids:
            out.finished_seq_ids, self._finished_ids = self._finished_ids, []
        return out

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Take a step's results: ``sampled`` maps seq_id -> token for every chunk that samples.

        For every chunk: ``num_computed_tokens += num_tokens`` and ``in_flight = False``; for chunks
        that sample, ``sampled[seq_id]`` is appended. Outputs must be passed back in the order they
        were scheduled. Sequences finished while in flight are only cleared, nothing is appended.
        """
        for chunk in output.chunks:
            seq = chunk.seq
            seq.in_flight -= 1
            seq.num_in_flight_tokens -= chunk.num_tokens
            if not seq.in_flight:
                seq.pending_sample = False
            if seq.status._finished:  # SequenceStatus.is_finished, without the property call
                continue
            assert seq.num_computed_tokens == chunk.start_pos, f"out-of-order update for {seq}"
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.samples:
                token = sampled.get(seq.seq_id)
                if token is None:
                    raise KeyError(f"no sampled token for sequence {seq.seq_id}, whose chunk samples")
                seq.output_token_ids.append(token)  # Sequence.append_token, inlined

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_new
        assert end <= self.config.max_model_len, f"{seq} would pass max_model_len; the engine must finish it"
        num_prompt = len(seq.prompt_token_ids)
        num_tokens = num_prompt + len(seq.output_token_ids)
        seq.in_flight += 1
        seq.num_in_flight_tokens += num_new
        seq.pending_sample = end == num_tokens
        # What the ranks have not been told yet (see ScheduledChunk).
        is_new = resumed = False
        if not seq.announced:
            seq.announced = is_new = True
            seq.num_tokens_sent = num_prompt
            seq.resume_pending = False
        elif seq.resume_pending:
            seq.resume_pending = False
            resumed = True
        new_tokens = new_blocks = ()
        if seq.num_tokens_sent < num_tokens:
            new_tokens = seq.output_token_ids[seq.num_tokens_sent - num_prompt:]
            seq.num_tokens_sent = num_tokens
        num_blocks = len(seq.block_ids)
        if seq.num_blocks_sent < num_blocks:
            new_blocks = seq.block_ids[seq.num_blocks_sent:]
            seq.num_blocks_sent = num_blocks
        return ScheduledChunk(seq, start, num_new, end == num_tokens, is_new, resumed, new_blocks, new_tokens)

    def _continues(self, seq: Sequence) -> bool:
        """Whether `seq` may run on before its pending token is known: its sampler needs no output
        token values (no penalties, no bad word of several tokens), and the token its in-flight
        chunk samples may not be its last: neither max_tokens nor max_model_len ends it there (a
        stop token may, found later)."""
        p = seq.params
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0 or p.bad_word_sequences:
            return False  # its sampling reads its output tokens: it waits for the pending one
        outputs = len(seq.output_token_ids) + 1
        max_tokens = p.max_tokens
        return (max_tokens is None or outputs < max_tokens) and (
            len(seq.prompt_token_ids) + outputs < self.config.max_model_len)

    def _pending_chunk(self, seq: Sequence) -> ScheduledChunk:
        """One token of `seq` after its in-flight chunk: the token that chunk samples. The ranks
        are told a placeholder (PENDING_TOKEN) in its place; the sampling rank feeds the real one
        on its device, so `num_tokens_sent` counts it already."""
        start = seq.num_computed_tokens + seq.num_in_flight_tokens
        seq.in_flight += 1
        seq.num_in_flight_tokens += 1
        seq.pending_sample = True
        seq.num_tokens_sent = len(seq.prompt_token_ids) + len(seq.output_token_ids) + 1
        new_blocks = ()
        if seq.num_blocks_sent < len(seq.block_ids):
            new_blocks = seq.block_ids[seq.num_blocks_sent:]
            seq.num_blocks_sent = len(seq.block_ids)
        return ScheduledChunk(seq, start, 1, True, new_block_ids=new_blocks, new_token_ids=(PENDING_TOKEN,),
                              pending=True)

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for ``num_new`` more tokens of running ``seq``, preempting newer
        sequences while short. False: ``seq`` gets nothing this step (it was preempted itself, or
        only in-flight sequences are newer)."""
        while not self.block_manager.allocate(seq, num_new):
            victim = self._pick_victim(seq)
            if victim is None:
                return False
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, seq: Sequence) -> Sequence | None:
        """The newest running sequence not in flight, if newer than ``seq``; ``seq`` itself if it
        is the newest running one; None if every newer one is in flight."""
        for candidate in reversed(self._running):
            if candidate is seq:
                return seq if candidate is self._running[-1] else None
            if not candidate.in_flight:
                return candidate
        raise AssertionError(f"{seq} is not running")

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drop ``seq``'s cache and requeue it at the front; it is recomputed on readmission."""
        self._running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_blocks_sent = 0
        seq.resume_pending = True  # the ranks keep its tokens; its next chunk replaces the table
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)
        out.preempted.append(seq)
