"""Turning the last stage's logits into tokens, on the one sampling rank.

Contract (vLLM's semantics):

- Reported logprobs are those of the RAW model distribution (log_softmax of the logits as the
  model produced them), whatever penalties or truncation shaped the choice. A token's rank is
  1 + the number of tokens with a strictly higher logprob.
- Processing order for the choice: min_tokens masking (eos and stop ids to -inf while the output
  is shorter than min_tokens), repetition penalty over prompt + output tokens, frequency and
  presence penalties over output tokens, temperature. Greedy rows (temperature < 1e-5) take the
  argmax of the penalised logits; the others apply top-k, top-p, then min_p, and sample.
- A seeded row draws its randomness only from its own generator, so the same seed gives the same
  tokens whatever else shares the batch. Unseeded rows use torch's default generator.
- `sample` does not append the chosen token to `output_token_ids`; the caller does.

Everything is vectorised over the batch; the only Python loop over rows draws seeded rows' noise.
This module imports torch only (never app/), so it can run on a rank that knows no users.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from strata.distributed.step_plan import SamplerOptions
from strata.sampling_params import GREEDY_EPS

# Below this a temperature means greedy; dividing by it would overflow.


class SequenceSamplingState:
    """One sequence's sampling state on the sampling rank; lives as long as the sequence.

    `generator` exists only for seeded requests. It is made on `device`, or, when that is None or
    not the logits' device, on the logits' device at the first draw (before any draw, so the seeded
    stream starts there from the beginning).
    `prompt_token_ids` is fixed; `output_token_ids` is appended to in place (the caller adds each
    sampled token) or replaced by a new list.
    """

    def __init__(
        self,
        options: SamplerOptions,
        prompt_token_ids: list[int],
        output_token_ids: list[int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.options = options
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = output_token_ids if output_token_ids is not None else []
        self.generator: torch.Generator | None = None
        if options.seed is not None and device is not None:
            self.generator = torch.Generator(device=device).manual_seed(options.seed)
        # C-int mirrors of the token lists: penalties need them as tensors every step, and
        # converting Python ints anew each step costs milliseconds at long contexts.
        self._prompt_ids = array("q", prompt_token_ids)
        self._output_ids = array("q", self.output_token_ids)
        self._mirrored = self.output_token_ids

    @property
    def is_greedy(self) -> bool:
        # top_k == 1 is greedy too; taking the argmax also fixes how ties break.
        return self.options.temperature < GREEDY_EPS or self.options.top_k == 1

    def generator_on(self, device: torch.device) -> torch.Generator | None:
        """This sequence's generator on `device` (None when unseeded)."""
        if self.options.seed is None:
            return None
        if self.generator is None or not _same_device(self.generator.device, device):
            self.generator = torch.Generator(device=device).manual_seed(self.options.seed)
        return self.generator

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


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.Generator(device="cuda").device has no index; the logits' device has one.
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@dataclass
class SampledToken:
    """One row's result. `top_logprobs` holds `options.logprobs` (token, logprob) pairs of the raw
    distribution, best first (empty when logprobs were not asked for)."""

    token_id: int
    logprob: float
    rank: int
    top_logprobs: list[tuple[int, float]]


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor without a stream sync (pageable H2D copies would sync)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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


def _logprob_report(
    logits: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    """Raw logprob and rank of `token_ids` per row, plus the top-k of each row; one sync at the end."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(1, token_ids.view(-1, 1))
    # Strictly higher logit <=> strictly higher logprob (same shift per row).
    ranks = (logits > chosen).sum(dim=-1) + 1
    chosen_lp = (chosen - lse).squeeze(1)
    if k > 0:
        top_vals, top_ids = logits.topk(k, dim=-1)
        top_lp = (top_vals - lse).tolist()
        top_ids_l = top_ids.tolist()
        tops = [list(zip(i, v, strict=True)) for i, v in zip(top_ids_l, top_lp, strict=True)]
    else:
        tops = [[] for _ in range(logits.shape[0])]
    return chosen_lp.tolist(), ranks.tolist(), tops


class Sampler:
    """Stateless; all per-sequence state lives in SequenceSamplingState."""

    def sample(self, logits: torch.Tensor, states: list[SequenceSamplingState]) -> list[SampledToken]:
        """Choose one token per row of `logits` [S, V] (float32), row i belonging to `states[i]`."""
        assert logits.dim() == 2 and logits.shape[0] == len(states), "one logits row per state"
        if not states:
            return []
        raw = logits.float()
        x = raw.clone()  # processed copy; `raw` stays untouched for logprobs
        self._mask_min_tokens(x, states)
        self._apply_penalties(x, states)

        greedy = [s.is_greedy for s in states]
        token_ids = x.argmax(dim=-1) if any(greedy) else None
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if random_rows:
            sub_states = [states[i] for i in random_rows]
            if len(random_rows) == len(states):
                token_ids = self._sample_random(x, sub_states)
            else:
                rows = _tensor(random_rows, torch.long, x.device)
                token_ids.index_copy_(0, rows, self._sample_random(x[rows], sub_states))

        k = min(max((s.options.logprobs or 0 for s in states), default=0), raw.shape[1])
        lps, ranks, tops = _logprob_report(raw, token_ids, k)
        ids = token_ids.tolist()
        return [
            SampledToken(ids[i], lps[i], ranks[i], tops[i][: s.options.logprobs or 0])
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
        targets = _tensor(target_ids, torch.long, logits.device)
        lps, ranks, tops = _logprob_report(logits.float(), targets, min(k, logits.shape[1]))
        return list(zip(lps, ranks, tops, strict=True))

    # -- processing steps, in order; each edits `x` in place ---------------------------------------

    @staticmethod
    def _mask_min_tokens(x: torch.Tensor, states: list[SequenceSamplingState]) -> None:
        vocab = x.shape[1]
        flat: list[int] = []  # row * V + token: one index_fill_ (x[rows, cols] = v would sync)
        for i, s in enumerate(states):
            if len(s.output_token_ids) < s.options.min_tokens:
                flat += [i * vocab + t for t in s.options.stop_token_ids if 0 <= t < vocab]
        if flat:
            x.view(-1).index_fill_(0, _tensor(flat, torch.long, x.device), float("-inf"))

    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: list[SequenceSamplingState]) -> None:
        vocab, dev = x.shape[1], x.device
        rep = [i for i, s in enumerate(states) if s.options.repetition_penalty != 1.0]
        if rep:
            idx = _tensor(rep, torch.long, dev)
            seen = _token_counts(
                [[states[i].prompt_ids(), states[i].output_ids()] for i in rep], vocab, dev
            ) > 0
            p = _tensor([states[i].options.repetition_penalty for i in rep], torch.float32, dev)
            p = p.unsqueeze(1)
            sub = x[idx]
            # Push seen tokens toward "less likely" whatever their sign.
            penalised = torch.where(sub > 0, sub / p, sub * p)
            x.index_copy_(0, idx, torch.where(seen, penalised, sub))
        freq = [
            i for i, s in enumerate(states)
            if s.options.frequency_penalty != 0.0 or s.options.presence_penalty != 0.0
        ]
        if freq:
            idx = _tensor(freq, torch.long, dev)
            counts = _token_counts([[states[i].output_ids()] for i in freq], vocab, dev)
            fp = _tensor([states[i].options.frequency_penalty for i in freq], torch.float32, dev)
            pp = _tensor([states[i].options.presence_penalty for i in freq], torch.float32, dev)
            sub = x[idx] - fp.unsqueeze(1) * counts - pp.unsqueeze(1) * (counts > 0).float()
            x.index_copy_(0, idx, sub)

    @staticmethod
    def _sample_random(x: torch.Tensor, states: list[SequenceSamplingState]) -> torch.Tensor:
        """Temperature, top-k, top-p, min_p, then one draw per row. `x` is [R, V], all non-greedy."""
        dev, vocab = x.device, x.shape[1]
        opts = [s.options for s in states]
        temps = _tensor([o.temperature for o in opts], torch.float32, dev)
        x = x / temps.unsqueeze(1)

        ks = [o.top_k if 0 < o.top_k < vocab else vocab for o in opts]  # vocab: top-k off
        use_k = any(k < vocab for k in ks)
        if any(o.top_p < 1.0 for o in opts):
            # One sort serves both. Top-k keeps logits >= the k-th largest (ties at it survive, as
            # in vLLM); top-p then drops tokens whose better-ranked mass already reaches p.
            sorted_x, order = x.sort(dim=-1, descending=True)
            if use_k:
                kth = sorted_x.gather(1, _tensor(ks, torch.long, dev).unsqueeze(1) - 1)
                sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
            probs = sorted_x.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Rows with top_p == 1 get a threshold above any cumulative sum rounding can reach.
            ps = _tensor([o.top_p if o.top_p < 1.0 else 2.0 for o in opts], torch.float32, dev)
            drop = mass_before >= ps.unsqueeze(1)
            drop[:, 0] = False  # the best token always survives
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(1, order, sorted_x)
        elif use_k:
            # Top-k alone needs no full sort: topk(largest k) yields every row's k-th largest.
            k_max = max(k for k in ks if k < vocab)
            top = x.topk(k_max, dim=-1).values
            kth = top.gather(1, _tensor([min(k, k_max) - 1 for k in ks], torch.long, dev).unsqueeze(1))
            off = _tensor([k >= vocab for k in ks], torch.bool, dev).unsqueeze(1)
            kth = kth.masked_fill(off, float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))

        if any(o.min_p > 0.0 for o in opts):
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed, and
            # the ratio does not depend on renormalisation after top-k/top-p.
            min_p = _tensor([o.min_p for o in opts], torch.float32, dev)
            floor = x.max(dim=-1, keepdim=True).values + min_p.log().unsqueeze(1)
            x = x.masked_fill(x < floor, float("-inf"))

        probs = x.softmax(dim=-1)
        # Exponential race: argmax(p / q), q ~ Exp(1), is a draw from p with no host sync
        # (multinomial would sync). Seeded rows redraw their q from their own generator.
        q = torch.empty_like(probs).exponential_()
        for row, s in enumerate(states):
            generator = s.generator_on(q.device)
            if generator is not None:
                q[row].exponential_(generator=generator)
        q.clamp_(min=torch.finfo(q.dtype).tiny)  # a zero would turn a masked 0/0 into NaN
        return (probs / q).argmax(dim=-1)
