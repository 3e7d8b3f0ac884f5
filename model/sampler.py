"""Turning the last stage's logits into tokens, on the one sampling rank.

Contract (vLLM's semantics):

- Reported logprobs are those of the RAW model distribution (log_softmax of the logits as the
  model produced them), whatever penalties or truncation shaped the choice. A token's rank is
  1 + the number of tokens with a strictly higher logprob.
- Processing order for the choice: min_tokens masking (eos and stop ids to -inf while the output
  is shorter than min_tokens), repetition penalty over prompt + output tokens, frequency and
  presence penalties over output tokens, temperature. Greedy rows (temperature < 1e-5, or
  top_k == 1) take the argmax of the penalised logits (ties: the lowest token id); the others
  apply top-k, top-p, then min_p, and sample.
- A seeded row's randomness is a pure function of (seed, position), position being the number of
  tokens the sequence has generated so far (model/sampling_noise.py). So the same seed gives the
  same tokens whatever else shares the batch and on whichever row it sits, and a sequence resumed
  after preemption, or rebuilt after a fault from its prompt and the tokens it had produced,
  continues the same stream: there is no generator state to keep. Unseeded rows draw from torch's
  default generator.
- `sample` does not append the chosen token to `output_token_ids`; the caller does.

Everything is vectorised over the batch: the rows' parameters travel to the device as one packed
buffer per step (SamplingTensors), seeded and unseeded noise is drawn for all rows at once, and no
torch call is made per row. The host work per step is list building over the rows (their cached
parameter records, lengths, stop ids). The only device-to-host reads are the final results'.
This module imports torch only (never app/), so it can run on a rank that knows no users.
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from functools import reduce
from operator import or_

import torch

from strata.distributed.step_plan import SamplerOptions
from strata.model import sampling_noise
from strata.sampling_params import GREEDY_EPS

# A row's static parameters as sent to the device: six float32 (temperature, top_p with 2.0 for
# "off", min_p, repetition, frequency, presence penalty), then two int64 (top_k as given, seed as
# int64 bits). 40 bytes, a multiple of 8, so the int64 columns stay aligned in the packed buffer.
_RECORD = struct.Struct("<6f2q")
_FLOAT_BYTES = 24
_TEMPERATURE, _TOP_P, _MIN_P, _REPETITION, _FREQUENCY, _PRESENCE = range(6)
_TOP_K, _SEED = range(2)
_F32_MAX = float(torch.finfo(torch.float32).max)
# A row's needs as bits, so a batch's are one OR over its rows.
_F_GREEDY, _F_SEEDED, _F_TOP_P, _F_TOP_K, _F_MIN_P, _F_REPETITION, _F_FREQUENCY, _F_MIN_TOKENS = (
    1 << i for i in range(8)
)


def _f32(value: float) -> float:
    # struct's "f" refuses values beyond float32; a temperature of 1e39 is as good as its max.
    return min(max(float(value), -_F32_MAX), _F32_MAX)


class SequenceSamplingState:
    """One sequence's sampling state on the sampling rank; lives as long as the sequence.

    `prompt_token_ids` is fixed; `output_token_ids` is appended to in place (the caller adds each
    sampled token) or replaced by a new list. Its length is the sequence's position in its seeded
    noise stream, so a state rebuilt with the same prompt and outputs continues exactly.
    `options` is read once, when assigned: to change a sequence's options, assign a new
    SamplerOptions (mutating the old one's fields in place is not seen).
    """

    def __init__(
        self,
        options: SamplerOptions,
        prompt_token_ids: list[int],
        output_token_ids: list[int] | None = None,
    ) -> None:
        self.options = options
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = output_token_ids if output_token_ids is not None else []
        # C-int mirrors of the token lists: penalties need them as tensors every step, and
        # converting Python ints anew each step costs milliseconds at long contexts.
        self._prompt_ids = array("q", prompt_token_ids)
        self._output_ids = array("q", self.output_token_ids)
        self._mirrored = self.output_token_ids

    @property
    def options(self) -> SamplerOptions:
        return self._options

    @options.setter
    def options(self, options: SamplerOptions) -> None:
        # Everything a step needs of the options, derived once: reading six attributes of every row
        # and converting them anew each step would cost more than the sampling at large batches.
        self._options = o = options
        self.is_greedy = o.temperature < GREEDY_EPS or o.top_k == 1  # top_k 1: argmax fixes ties
        self.is_seeded = o.seed is not None
        self._record = _RECORD.pack(
            *map(_f32, (o.temperature, o.top_p if o.top_p < 1.0 else 2.0, o.min_p, o.repetition_penalty,
                        o.frequency_penalty, o.presence_penalty)),
            o.top_k if 0 < o.top_k < 1 << 62 else 0,  # 0: off (as is any k >= vocab, on the device)
            sampling_noise.to_int64(o.seed) if o.seed is not None else 0,
        )
        self._top_k = o.top_k
        self._min_tokens = o.min_tokens
        self._stop_ids = tuple(o.stop_token_ids)
        self._logprobs = o.logprobs or 0
        self._flags = (
            _F_GREEDY * self.is_greedy | _F_SEEDED * self.is_seeded | _F_TOP_P * (o.top_p < 1.0)
            | _F_TOP_K * (o.top_k > 0) | _F_MIN_P * (o.min_p > 0.0) | _F_REPETITION * (o.repetition_penalty != 1.0)
            | _F_FREQUENCY * (o.frequency_penalty != 0.0 or o.presence_penalty != 0.0)
            | _F_MIN_TOKENS * (o.min_tokens > 0 and bool(o.stop_token_ids))
        )

    @property
    def position(self) -> int:
        """The number of tokens generated so far: where the seeded stream stands."""
        return len(self.output_token_ids)

    def prompt_ids(self) -> array:
        return self._prompt_ids

    def output_ids(self) -> array:
        """`output_token_ids` as a C array, brought up to date with what the caller appended."""
        mirrored = len(self._output_ids)
        if self.output_token_ids is not self._mirrored or len(self.output_token_ids) < mirrored:
            self._mirrored = self.output_token_ids  # a new list: rebuild rather than trust a prefix
            self._output_ids = array("q", self.output_token_ids)
        else:
            self._output_ids.extend(self.output_token_ids[mirrored:])
        return self._output_ids


@dataclass
class SampledToken:
    """One row's result. `top_logprobs` holds `options.logprobs` (token, logprob) pairs of the raw
    distribution, best first (empty when logprobs were not asked for)."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a stream sync (pageable H2D copies would sync)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _to_device(torch.tensor(values, dtype=dtype), device)


class SamplingTensors:
    """One step's per-row sampling parameters on the device, and the host facts that decide which
    processing steps run at all (no device value is ever read back to decide).

    Built from the rows' cached records in one packed host-to-device copy (none at all when no
    row samples, and none needs penalties or min_tokens masking: then the tensors below are None).
    Per-row device tensors ([R], row i = states[i]): temperature, top_p (2.0 where off), min_p,
    repetition_penalty, frequency_penalty, presence_penalty, top_k (vocab where off), seed (int64
    bits, 0 where unseeded), position (tokens generated so far). `random_index` (which rows sample,
    None when all do), `seeded_index` (which of the sampling rows are seeded, None when all or none
    are) and `min_tokens_index` (flat row * V + token ids to mask, None when none) are int64 device
    tensors from the same copy.
    """

    def __init__(self, states: list[SequenceSamplingState], vocab: int, device: torch.device) -> None:
        n = len(states)
        self.vocab = vocab
        flags = [s._flags for s in states]
        batch = reduce(or_, flags, 0)
        self.any_greedy = bool(batch & _F_GREEDY)
        if self.any_greedy:
            self.random_rows = [i for i, f in enumerate(flags) if not f & _F_GREEDY]
            rnd = [states[i] for i in self.random_rows]
            rnd_flags = [flags[i] for i in self.random_rows]
        else:
            self.random_rows, rnd, rnd_flags = list(range(n)), states, flags
        self.all_random = not self.any_greedy
        # Truncation facts over the sampling rows only (a greedy row's knobs cannot matter).
        sampling = reduce(or_, rnd_flags, 0)
        seeded = [j for j, f in enumerate(rnd_flags) if f & _F_SEEDED] if sampling & _F_SEEDED else []
        self.any_seeded, self.all_seeded = bool(seeded), len(seeded) == len(rnd)
        self.any_top_p = bool(sampling & _F_TOP_P)
        self.any_min_p = bool(sampling & _F_MIN_P)
        ks = [s._top_k for s in rnd if 0 < s._top_k < vocab] if sampling & _F_TOP_K else []
        self.top_k_max = max(ks) if ks else 0  # 0: no sampling row truncates by top-k
        self.any_repetition = bool(batch & _F_REPETITION)
        self.any_frequency = bool(batch & _F_FREQUENCY)
        positions = [len(s.output_token_ids) for s in states]
        min_tokens_flat = [
            i * vocab + t
            for i, s in enumerate(states) if positions[i] < s._min_tokens
            for t in s._stop_ids if 0 <= t < vocab
        ] if batch & _F_MIN_TOKENS else []

        self.floats = self.seed = self.position = None
        self.random_index = self.seeded_index = self.min_tokens_index = None
        self._raw_top_k = self._top_k = None
        if self.random_rows or self.any_repetition or self.any_frequency or min_tokens_flat:
            self._upload(states, positions, seeded, min_tokens_flat, device)

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
        buf = _to_device(host, device) if device.type == "cuda" else host.clone()
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
        return self.floats[:, _TEMPERATURE]

    @property
    def top_p(self) -> torch.Tensor:
        return self.floats[:, _TOP_P]

    @property
    def min_p(self) -> torch.Tensor:
        return self.floats[:, _MIN_P]

    @property
    def repetition_penalty(self) -> torch.Tensor:
        return self.floats[:, _REPETITION]

    @property
    def frequency_penalty(self) -> torch.Tensor:
        return self.floats[:, _FREQUENCY]

    @property
    def presence_penalty(self) -> torch.Tensor:
        return self.floats[:, _PRESENCE]


def _token_counts(rows: list[list[array]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float counts of each token id per row; row r counts the tokens of all of `rows[r]`."""
    flat = array("q")
    lengths = []
    for parts in rows:
        for part in parts:
            flat.extend(part)  # array-to-array extend: a memcpy
        lengths.append(sum(len(part) for part in parts))
    counts = torch.zeros(len(rows) * vocab, dtype=torch.float32, device=device)
    if flat:
        ids = torch.frombuffer(flat, dtype=torch.long)
        lens = torch.tensor(lengths)
        if device.type == "cuda":
            ids, lens = ids.pin_memory(), lens.pin_memory()
        ids, lens = ids.to(device, non_blocking=True), lens.to(device, non_blocking=True)
        # Row offsets on the device (output_size given: no sync); on the host this was the hot spot.
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device), lens, output_size=len(flat))
        ids = ids.clamp(0, vocab - 1) + row_of * vocab
        counts.index_add_(0, ids, torch.ones(len(flat), dtype=torch.float32, device=device))
    return counts.view(len(rows), vocab)


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> host with one wait: async copies (into pinned memory), then one sync."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    host = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return host


def _logprob_report(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[list[float], list[int], list[list[tuple[int, float]]], list[int]]:
    """Raw logprob and rank of `token_ids` per row, plus the top-k of each row, and the ids
    themselves, read back with one wait for the device."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(1, token_ids.view(-1, 1))
    # Strictly higher logit <=> strictly higher logprob (same shift per row).
    ranks = (logits > chosen).sum(dim=-1) + 1
    parts = [token_ids, (chosen - lse).squeeze(1), ranks]
    if k > 0:
        top_vals, top_ids = logits.topk(k, dim=-1)
        parts += [top_vals - lse, top_ids]
    host = [t.tolist() for t in _to_host(parts)]
    if k > 0:
        tops = [list(zip(i, v, strict=True)) for i, v in zip(host[4], host[3], strict=True)]
    else:
        tops = [[] for _ in host[0]]
    return host[1], host[2], tops, host[0]


class Sampler:
    """Stateless; all per-sequence state lives in SequenceSamplingState."""

    def sample(self, logits: torch.Tensor, states: list[SequenceSamplingState]) -> list[SampledToken]:
        """Choose one token per row of `logits` [S, V] (float32), row i belonging to `states[i]`."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one logits row per state"
        if not states:
            return []
        raw = logits.float()
        t = SamplingTensors(states, raw.shape[1], raw.device)
        # A processed copy when something edits in place; `raw` stays untouched for logprobs.
        edited = t.min_tokens_index is not None or t.any_repetition or t.any_frequency
        x = raw.clone() if edited else raw
        self._mask_min_tokens(x, states, t)
        self._apply_penalties(x, states, t)

        token_ids = x.argmax(dim=-1) if t.any_greedy else None
        if t.random_rows:
            if t.all_random:
                token_ids = self._sample_random(x, t)
            else:
                rows = t.random_index
                token_ids.index_copy_(0, rows, self._sample_random(x[rows], t))

        k = min(max(s._logprobs for s in states), raw.shape[1])
        lps, ranks, tops, ids = _logprob_report(raw, token_ids, k)
        return [
            SampledToken(ids[i], lps[i], ranks[i], tops[i][: s._logprobs])
            for i, s in enumerate(states)
        ]

    def prompt_logprobs(
        self, logits: torch.Tensor, target_ids: list[int], k: int
    ) -> list[tuple[float, int, list[tuple[int, float]]]]:
        """For each prompt position: (raw logprob of the actual next prompt token, its rank, top-k).

        `logits` [n, V] row j is the model's prediction after prompt position j; `target_ids[j]` is
        the prompt token that really followed.
        """
        assert logits.shape[0] == len(target_ids), "one target per logits row"
        if not target_ids:
            return []
        targets = _tensor(target_ids, torch.long, logits.device)
        lps, ranks, tops, _ = _logprob_report(logits.float(), targets, min(k, logits.shape[1]))
        return list(zip(lps, ranks, tops, strict=True))

    # -- processing steps, in order; each edits `x` in place ---------------------------------------

    @staticmethod
    def _mask_min_tokens(
        x: torch.Tensor, states: list[SequenceSamplingState], t: SamplingTensors | None = None
    ) -> None:
        t = t or SamplingTensors(states, x.shape[1], x.device)
        if t.min_tokens_index is not None:  # one index_fill_ (x[rows, cols] = v would sync)
            x.view(-1).index_fill_(0, t.min_tokens_index, float("-inf"))

    @staticmethod
    def _apply_penalties(
        x: torch.Tensor, states: list[SequenceSamplingState], t: SamplingTensors | None = None
    ) -> None:
        """Over the whole batch at once; a row without a penalty gets zero counts (and factors 1
        and 0), which leaves it bit-for-bit untouched."""
        t = t or SamplingTensors(states, x.shape[1], x.device)
        vocab, dev = x.shape[1], x.device
        if t.any_repetition:
            seen = _token_counts(
                [[s.prompt_ids(), s.output_ids()] if s._flags & _F_REPETITION else [] for s in states], vocab, dev
            ) > 0
            p = t.repetition_penalty.unsqueeze(1)
            # Push seen tokens toward "less likely" whatever their sign.
            penalised = torch.where(x > 0, x / p, x * p)
            x.copy_(torch.where(seen, penalised, x))
        if t.any_frequency:
            counts = _token_counts([[s.output_ids()] if s._flags & _F_FREQUENCY else [] for s in states], vocab, dev)
            x.sub_(t.frequency_penalty.unsqueeze(1) * counts + t.presence_penalty.unsqueeze(1) * (counts > 0))

    @staticmethod
    def _sample_random(x: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
        """Temperature, top-k, top-p, min_p, then one draw per row. `x` is [R, V], the sampling rows
        of the batch (t.random_rows) in order."""
        vocab = x.shape[1]
        use_k = t.top_k_max > 0
        floats, top_k, seed, position = t.floats, t.top_k if use_k else None, t.seed, t.position
        if not t.all_random:
            idx = t.random_index
            floats, seed, position = floats[idx], seed[idx], position[idx]
            top_k = top_k[idx] if use_k else None
        x = x / floats[:, _TEMPERATURE].unsqueeze(1)

        if t.any_top_p:
            # One sort serves both. Top-k keeps logits >= the k-th largest (ties at it survive, as
            # in vLLM); top-p then drops tokens whose better-ranked mass already reaches p.
            sorted_x, order = x.sort(dim=-1, descending=True)
            if use_k:
                kth = sorted_x.gather(1, top_k.unsqueeze(1) - 1)
                sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
            probs = sorted_x.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Rows with top_p off carry 2.0, a threshold above any cumulative sum rounding can reach.
            drop = mass_before >= floats[:, _TOP_P].unsqueeze(1)
            drop[:, 0] = False  # the best token always survives
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        elif use_k:
            # Top-k alone needs no full sort: topk(largest k) yields every row's k-th largest.
            top = x.topk(t.top_k_max, dim=-1).values
            kth = top.gather(1, top_k.clamp(max=t.top_k_max).unsqueeze(1) - 1)
            kth = kth.masked_fill((top_k >= vocab).unsqueeze(1), float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))

        if t.any_min_p:
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed, and
            # the ratio does not depend on renormalisation after top-k/top-p. min_p 0 gives -inf.
            floor = x.max(dim=-1, keepdim=True).values + floats[:, _MIN_P].log().unsqueeze(1)
            x = x.masked_fill(x < floor, float("-inf"))

        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / q), q ~ Exp(1) per token, is a draw from p with no host sync
        # (multinomial would sync). Seeded rows' q is a function of (seed, position, token) only.
        if t.all_seeded:
            q = sampling_noise.exponential(seed, position, vocab)
        else:
            q = torch.empty_like(probs).exponential_()
            if t.any_seeded:
                s = t.seeded_index
                q.index_copy_(0, s, sampling_noise.exponential(seed[s], position[s], vocab))
        q.clamp_(min=torch.finfo(q.dtype).tiny)  # a zero would turn a masked 0/0 into NaN
        return (probs / q).argmax(dim=-1)
