"""One step's per-row sampling parameters on the device (SamplingTensors), and the row record
they are packed from.

Each SequenceSamplingState (model/sampler.py) derives, once per options, a row record
(`pack_row`: the static parameters as the device reads them) and a row's needs as bits
(`row_flags`). A step packs the rows' records, their positions and the index lists into one
host buffer, copied to the device at once; the batch's flags (one OR over its rows) decide which
processing steps run at all, so no device value is ever read back to decide.
"""

from __future__ import annotations

import struct
from array import array
from functools import reduce
from operator import or_
from typing import TYPE_CHECKING

import torch

from strata.model import sampling_noise

if TYPE_CHECKING:
    from strata.distributed.sampler_options import SamplerOptions
    from strata.model.sampler import SequenceSamplingState

# A row's static parameters as sent to the device: six float32 (temperature, top_p with 2.0 for
# "off", min_p, repetition, frequency, presence penalty), then two int64 (top_k as given, seed as
# int64 bits). 40 bytes, a multiple of 8, so the int64 columns stay aligned in the packed buffer.
_RECORD = struct.Struct("<6f2q")
_FLOAT_BYTES = 24
TEMPERATURE, TOP_P, MIN_P, REPETITION, FREQUENCY, PRESENCE = range(6)  # columns of SamplingTensors.floats
_TOP_K, _SEED = range(2)
_F32_MAX = float(torch.finfo(torch.float32).max)
# A row's needs as bits, so a batch's are one OR over its rows.
(F_GREEDY, F_SEEDED, F_TOP_P, F_TOP_K, F_MIN_P, F_REPETITION, F_FREQUENCY, F_MIN_TOKENS, F_BANNED, F_BIAS, F_ALLOWED,
 F_GRAMMAR, F_BANNED_SEQUENCES) = (1 << i for i in range(13))


def _f32(value: float) -> float:
    # struct's "f" refuses values beyond float32; a temperature of 1e39 is as good as its max.
    return min(max(float(value), -_F32_MAX), _F32_MAX)


def pack_row(o: SamplerOptions) -> bytes:
    """A row's record: its static parameters in the layout above."""
    return _RECORD.pack(
        *map(_f32, (o.temperature, o.top_p if o.top_p < 1.0 else 2.0, o.min_p, o.repetition_penalty,
                    o.frequency_penalty, o.presence_penalty)),
        o.top_k if 0 < o.top_k < 1 << 62 else 0,  # 0: off (as is any k >= vocab, on the device)
        sampling_noise.to_int64(o.seed) if o.seed is not None else 0,
    )


def row_flags(o: SamplerOptions, is_greedy: bool) -> int:
    """A row's needs as F_* bits."""
    return (
        F_GREEDY * is_greedy | F_SEEDED * (o.seed is not None) | F_TOP_P * (o.top_p < 1.0)
        | F_TOP_K * (o.top_k > 0) | F_MIN_P * (o.min_p > 0.0) | F_REPETITION * (o.repetition_penalty != 1.0)
        | F_FREQUENCY * (o.frequency_penalty != 0.0 or o.presence_penalty != 0.0)
        | F_MIN_TOKENS * (o.min_tokens > 0 and bool(o.stop_token_ids))
        | F_BANNED * bool(o.banned_token_ids) | F_BIAS * bool(o.bias_token_ids) | F_ALLOWED * bool(o.allowed_token_ids)
        | F_GRAMMAR * bool(o.grammar_kind) | F_BANNED_SEQUENCES * bool(o.banned_sequences)
    )


def completed_bad_words(state: SequenceSamplingState) -> list[int]:
    """The last ids of the row's bad words of several tokens whose other ids end its output so
    far (vLLM's rule: output tokens only, not the prompt). The output is current: the scheduler
    does not run such a sequence ahead of its pending token (Scheduler._continues)."""
    out = state.output_ids()
    banned = []
    for ids in state.options.banned_sequences:
        n = len(ids) - 1
        if n <= len(out) and out[len(out) - n:].tolist() == ids[:n]:
            banned.append(ids[-1])
    return banned


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a stream sync (pageable H2D copies would sync)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class SamplingTensors:
    """One step's per-row sampling parameters on the device, and the host facts that decide which
    processing steps run at all (no device value is ever read back to decide).

    Built from the rows' cached records in one packed host-to-device copy (none at all when no
    row samples, and none needs penalties or min_tokens masking: then the tensors below are None).
    Per-row device tensors ([R], row i = states[i]): temperature, top_p (2.0 where off), min_p,
    repetition_penalty, frequency_penalty, presence_penalty, top_k (vocab where off), seed (int64
    bits, 0 where unseeded), position (tokens generated so far). `random_index` (which rows sample,
    None when all do), `seeded_index` (which of the sampling rows are seeded, None when all or none
    are) and `min_tokens_index` (flat row * V + token ids to mask, None when none: min_tokens' stop
    ids and bad_words) are int64 device tensors from the same copy. Rows with logit_bias or
    allowed_token_ids add a copy of their own: `bias_index` / `bias_values` (flat ids, float32
    values to add) and `allowed_rows` / `allowed_index` (the rows, and the flat ids they keep).
    """

    def __init__(self, states: list[SequenceSamplingState], vocab: int, device: torch.device) -> None:
        n = len(states)
        self.vocab = vocab
        flags = [s._flags for s in states]
        batch = reduce(or_, flags, 0)
        self.any_greedy = bool(batch & F_GREEDY)
        if self.any_greedy:
            self.random_rows = [i for i, f in enumerate(flags) if not f & F_GREEDY]
            rnd = [states[i] for i in self.random_rows]
            rnd_flags = [flags[i] for i in self.random_rows]
        else:
            self.random_rows, rnd, rnd_flags = list(range(n)), states, flags
        self.all_random = not self.any_greedy
        # Truncation facts over the sampling rows only (a greedy row's knobs cannot matter).
        sampling = reduce(or_, rnd_flags, 0)
        seeded = [j for j, f in enumerate(rnd_flags) if f & F_SEEDED] if sampling & F_SEEDED else []
        self.any_seeded, self.all_seeded = bool(seeded), len(seeded) == len(rnd)
        self.any_top_p = bool(sampling & F_TOP_P)
        self.any_min_p = bool(sampling & F_MIN_P)
        ks = [s._top_k for s in rnd if 0 < s._top_k < vocab] if sampling & F_TOP_K else []
        self.top_k_max = max(ks) if ks else 0  # 0: no sampling row truncates by top-k
        self.any_repetition = bool(batch & F_REPETITION)
        self.any_frequency = bool(batch & F_FREQUENCY)
        self.any_grammar = bool(batch & F_GRAMMAR)  # rows whose options carry a structured-output grammar
        positions = [s.num_sampled for s in states]  # where each seeded stream stands
        min_tokens_flat = [
            i * vocab + t
            for i, s in enumerate(states) if positions[i] < s._min_tokens
            for t in s._stop_ids if 0 <= t < vocab
        ] if batch & F_MIN_TOKENS else []
        if batch & F_BANNED:  # bad_words: masked at every position, as min_tokens' ids are early on
            min_tokens_flat += [i * vocab + t for i, s in enumerate(states) for t in s.options.banned_token_ids
                                if 0 <= t < vocab]
        if batch & F_BANNED_SEQUENCES:
            min_tokens_flat += [i * vocab + t for i, s in enumerate(states) if s._flags & F_BANNED_SEQUENCES
                                for t in completed_bad_words(s) if 0 <= t < vocab]
        self.bias_index = self.bias_values = self.allowed_rows = self.allowed_index = None
        if batch & (F_BIAS | F_ALLOWED):
            self._upload_constraints(states, flags, vocab, device)

        self.floats = self.seed = self.position = None
        self.random_index = self.seeded_index = self.min_tokens_index = None
        self._raw_top_k = self._top_k = None
        if self.random_rows or self.any_repetition or self.any_frequency or min_tokens_flat:
            self._upload(states, positions, seeded, min_tokens_flat, device)

    def _upload_constraints(self, states, flags, vocab, device) -> None:
        """logit_bias and allowed_token_ids as flat indices (ids outside [0, vocab) dropped)."""
        bias_ids, bias_values, rows, allowed = array("q"), array("f"), array("q"), array("q")
        for i, (s, f) in enumerate(zip(states, flags, strict=True)):
            o = s.options
            if f & F_BIAS:
                for t, v in zip(o.bias_token_ids, o.bias_values, strict=True):
                    if 0 <= t < vocab:
                        bias_ids.append(i * vocab + t)
                        bias_values.append(v)
            if f & F_ALLOWED:
                rows.append(i)
                allowed.extend(i * vocab + t for t in o.allowed_token_ids if 0 <= t < vocab)
        if bias_ids:
            self.bias_index = to_device(torch.frombuffer(bias_ids, dtype=torch.int64), device)
            self.bias_values = to_device(torch.frombuffer(bias_values, dtype=torch.float32), device)
        if rows:
            self.allowed_rows = to_device(torch.frombuffer(rows, dtype=torch.int64), device)
            self.allowed_index = to_device(torch.tensor(allowed.tolist(), dtype=torch.int64), device)

    def _upload(self, states, positions, seeded, min_tokens_flat, device) -> None:
        """One copy: the rows' records, then positions and the index lists as int64."""
        n = len(states)
        sizes = [n, 0 if self.all_random else len(self.random_rows), 0 if self.all_seeded else len(seeded),
                 len(min_tokens_flat)]
        dynamic = array("q", positions)
        if not self.all_random:
            dynamic.extend(self.random_rows)
        if not self.all_seeded:
            dynamic.extend(seeded)
        dynamic.extend(min_tokens_flat)
        packed = bytearray(b"".join([s._record for s in states]))
        packed += dynamic.tobytes()
        host = torch.frombuffer(packed, dtype=torch.uint8)
        buf = to_device(host, device) if device.type == "cuda" else host.clone()
        records = buf[: n * _RECORD.size].view(n, _RECORD.size)
        self.floats = records[:, :_FLOAT_BYTES].view(torch.float32)  # [R, 6]
        ints = records[:, _FLOAT_BYTES:].view(torch.int64)  # [R, 2]
        position, random_index, seeded_index, min_tokens_index = buf[n * _RECORD.size:].view(torch.int64).split(sizes)
        self.position = position
        self.random_index = None if self.all_random else random_index
        self.seeded_index = None if self.all_seeded or not seeded else seeded_index
        self.min_tokens_index = min_tokens_index if min_tokens_flat else None
        self._raw_top_k = ints[:, _TOP_K]
        self.seed = ints[:, _SEED]

    @property
    def top_k(self) -> torch.Tensor:
        """[R] int64, vocab where off (made on first use: only top-k truncation needs it)."""
        if self._top_k is None:
            k = self._raw_top_k
            self._top_k = torch.where((k > 0) & (k < self.vocab), k, self.vocab)
        return self._top_k

    @property
    def temperature(self) -> torch.Tensor:
        return self.floats[:, TEMPERATURE]

    @property
    def top_p(self) -> torch.Tensor:
        return self.floats[:, TOP_P]

    @property
    def min_p(self) -> torch.Tensor:
        return self.floats[:, MIN_P]

    @property
    def repetition_penalty(self) -> torch.Tensor:
        return self.floats[:, REPETITION]

    @property
    def frequency_penalty(self) -> torch.Tensor:
        return self.floats[:, FREQUENCY]

    @property
    def presence_penalty(self) -> torch.Tensor:
        return self.floats[:, PRESENCE]
