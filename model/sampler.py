"""Turning the last stage's logits into tokens, on the one sampling rank.

Contract (vLLM's semantics):

- Reported logprobs are those of the RAW model distribution (log_softmax of the logits as the
  model produced them), whatever penalties or truncation shaped the choice. A token's rank is
  1 + the number of tokens with a strictly higher logprob.
- A row with a structured-output grammar (model/grammar_mask.py) first has every token its
  grammar does not allow set to -inf, as vLLM applies its grammar bitmask before the sampler:
  its reported logprobs are those of that masked distribution; a row without one is untouched.
- Processing order for the choice (vLLM's): allowed_token_ids (every other id to -inf), logit_bias
  (added), bad_words (their ids to -inf) and min_tokens masking (eos and stop ids to -inf while
  the output is shorter than min_tokens), repetition penalty over prompt + output tokens, frequency and
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
buffer per step (SamplingTensors, model/sampling_tensors.py), min_tokens masking and the penalties
edit all rows at once (model/penalties.py), seeded and unseeded noise is drawn for all rows at
once, and no torch call is made per row. The host work per step is list building over the rows
(their cached parameter records, lengths, stop ids). The only device-to-host reads are the final
results'.
This module imports torch only (never app/), so it can run on a rank that knows no users.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from strata.distributed.sampler_options import SamplerOptions
from strata.model import sampling_noise
from strata.model.grammar_mask import GrammarState, apply_bitmask, fill_bitmask
from strata.model.kernels import triton_available
from strata.model.penalties import apply_penalties, mask_min_tokens
from strata.model.sampling_tensors import MIN_P, TEMPERATURE, TOP_P, SamplingTensors, pack_row, row_flags, to_device
from strata.sampling_params import GREEDY_EPS


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
        # Tokens sampled for it so far, counted when a draw is launched: with async scheduling
        # the next draw starts before this one's token reaches `output_token_ids`.
        self.num_sampled = len(self.output_token_ids)
        self.grammar: GrammarState | None = None
        """The structured-output matcher, when the options carry a grammar (the rank sets it)."""

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
        self._record = pack_row(o)
        self._top_k = o.top_k
        self._min_tokens = o.min_tokens
        self._stop_ids = tuple(o.stop_token_ids)
        self._logprobs = o.logprobs or 0
        self._wants_logprobs = o.logprobs is not None  # 0: the chosen token's logprob alone
        self._logprob_ids = list(o.logprob_token_ids)
        self._flags = row_flags(o, self.is_greedy)

    @property
    def position(self) -> int:
        """The number of tokens drawn so far (the ones still on their way to `output_token_ids`
        included): where the seeded stream stands."""
        return self.num_sampled

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


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


class LogprobReport:
    """Raw logprob and rank of the chosen ids per row, the top-k of each row, and the ids
    themselves: computed on the device, copied to the host without waiting (`launch`), read with
    one wait (`read`) when the caller needs them, which may be a step later."""

    def __init__(self, logits: torch.Tensor, token_ids: torch.Tensor, k: int,
                 chosen_ids: list[list[int]] | None = None, wanted: bool = True):
        """`chosen_ids[i]`, when not empty, are the ids row i reports instead of its top-k
        (vLLM's logprob_token_ids). `wanted` False: no row reports logprobs, only the ids are kept."""
        self.k = k
        self.token_ids = token_ids  # on the device: a later step can feed them as inputs
        self._chosen_lens = None
        if not wanted:  # no row reports logprobs: three [R, V] passes and two copies saved per step
            self._finish([token_ids])
            return
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        chosen = logits.gather(1, token_ids.view(-1, 1))
        # Strictly higher logit <=> strictly higher logprob (same shift per row).
        ranks = (logits > chosen).sum(dim=-1) + 1
        parts = [token_ids, (chosen - lse).squeeze(1), ranks]
        if k > 0:
            top_vals, top_ids = logits.topk(k, dim=-1)
            parts += [top_vals - lse, top_ids]
        self._chosen_lens = [len(c) for c in chosen_ids] if chosen_ids and any(chosen_ids) else None
        if self._chosen_lens is not None:
            width = max(self._chosen_lens)
            index = _tensor([c + [0] * (width - len(c)) for c in chosen_ids], torch.long, logits.device)
            parts += [logits.gather(1, index) - lse, index]
        self._finish(parts)

    def _finish(self, parts: list[torch.Tensor]) -> None:
        """Starts the copies of `parts` to the host (not waited for)."""
        token_ids = parts[0]
        self._event: torch.cuda.Event | None = None
        if token_ids.device.type == "cuda":
            self._host = [t.to("cpu", non_blocking=True) for t in parts]  # into pinned memory
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = parts

    def read(self) -> tuple[list[float], list[int], list[list[tuple[int, float]]], list[int]]:
        """(logprobs, ranks, top-k pairs, ids), waiting for the copies if they are not done."""
        if self._event is not None:
            self._event.synchronize()
        host = [t.tolist() for t in self._host]
        if len(host) == 1:  # not wanted: NaN logprobs and rank 0 say so, should anyone read them
            return [float("nan")] * len(host[0]), [0] * len(host[0]), [[] for _ in host[0]], host[0]
        if self.k > 0:
            tops = [list(zip(i, v, strict=True)) for i, v in zip(host[4], host[3], strict=True)]
        else:
            tops = [[] for _ in host[0]]
        if self._chosen_lens is not None:
            values, ids = host[-2], host[-1]
            for r, n in enumerate(self._chosen_lens):
                if n:
                    tops[r] = list(zip(ids[r][:n], values[r][:n], strict=True))
        return host[1], host[2], tops, host[0]


class PendingSample:
    """One step's draws, launched: `token_ids` on the device now, `tokens()` when they are read."""

    def __init__(self, report: LogprobReport | None, states: list[SequenceSamplingState]):
        self.report = report
        self.states = states

    @property
    def token_ids(self) -> torch.Tensor | None:
        return self.report.token_ids if self.report is not None else None

    def tokens(self) -> list[SampledToken]:
        if self.report is None:
            return []
        lps, ranks, tops, ids = self.report.read()
        return [SampledToken(ids[i], lps[i], ranks[i], tops[i][: s._logprobs]) for i, s in enumerate(self.states)]


def _apply_token_constraints(x: torch.Tensor, t: SamplingTensors) -> None:
    """allowed_token_ids, then logit_bias, in place; index ops only (no host sync)."""
    if t.allowed_rows is not None:
        flat = x.view(-1)
        keep = flat.index_select(0, t.allowed_index)
        x.index_fill_(0, t.allowed_rows, float("-inf"))
        flat.index_copy_(0, t.allowed_index, keep)
    if t.bias_index is not None:
        x.view(-1).index_add_(0, t.bias_index, t.bias_values)


def greedy_ids(x: torch.Tensor) -> torch.Tensor:
    """argmax over each row (ties: the lowest id); on CUDA one Triton program per row
    (`strata.model.kernels.argmax`: torch's own is the slowest kernel of a batch-1 step)."""
    if x.is_cuda and x.stride(-1) == 1 and triton_available():
        from strata.model.kernels.argmax import argmax_rows

        return argmax_rows(x)
    return x.argmax(dim=-1)


class Sampler:
    """Stateless; all per-sequence state lives in SequenceSamplingState."""

    def sample(self, logits: torch.Tensor, states: list[SequenceSamplingState]) -> list[SampledToken]:
        """Choose one token per row of `logits` [S, V] (float32), row i belonging to `states[i]`."""
        return self.launch(logits, states).tokens()

    def launch(self, logits: torch.Tensor, states: list[SequenceSamplingState]) -> PendingSample:
        """`sample` without waiting for the device: the chosen ids stay on it, their report is on
        its way to the host. Each state's position advances now (`num_sampled`); the caller appends
        the token to `output_token_ids` once read."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one logits row per state"
        if not states:
            return PendingSample(None, states)
        raw = logits.float()
        t = SamplingTensors(states, raw.shape[1], raw.device)
        grammar_rows = [i for i, s in enumerate(states) if s.grammar is not None] if t.any_grammar else []
        if grammar_rows:
            raw = raw.clone() if raw is logits else raw  # the caller's logits stay as the model made them
            packed = fill_bitmask(states, grammar_rows, raw.shape[1], [s.num_sampled for s in states])
            apply_bitmask(raw, to_device(packed, raw.device), len(grammar_rows))
        # A processed copy when something edits in place; `raw` stays untouched for logprobs.
        edited = (t.min_tokens_index is not None or t.any_repetition or t.any_frequency
                  or t.bias_index is not None or t.allowed_rows is not None)
        x = raw.clone() if edited else raw
        _apply_token_constraints(x, t)
        mask_min_tokens(x, states, t)
        apply_penalties(x, states, t)

        token_ids = greedy_ids(x) if t.any_greedy else None
        if t.random_rows:
            if t.all_random:
                token_ids = self._sample_random(x, t)
            else:
                rows = t.random_index
                token_ids.index_copy_(0, rows, self._sample_random(x[rows], t))

        k = min(max(s._logprobs for s in states), raw.shape[1])
        for i in grammar_rows:
            states[i].grammar.drawn(states[i].num_sampled, token_ids, i)
        for s in states:
            s.num_sampled += 1
        vocab = raw.shape[1]  # ids beyond it (the engine's own check is the caller's) are left out, not gathered
        chosen = [[t for t in s._logprob_ids if t < vocab] if s._logprob_ids else s._logprob_ids for s in states]
        wanted = any(s._wants_logprobs for s in states)
        return PendingSample(LogprobReport(raw, token_ids, k, chosen, wanted), states)

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
        lps, ranks, tops, _ = LogprobReport(logits.float(), targets, min(k, logits.shape[1])).read()
        return list(zip(lps, ranks, tops, strict=True))

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
        x = x / floats[:, TEMPERATURE].unsqueeze(1)

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
            drop = mass_before >= floats[:, TOP_P].unsqueeze(1)
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
            floor = x.max(dim=-1, keepdim=True).values + floats[:, MIN_P].log().unsqueeze(1)
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
        return greedy_ids(probs / q)
