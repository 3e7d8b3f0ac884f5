"""The output processor (caller side): hand-made engine deltas -> text, stop strings, logprobs and
RequestOutputs, on the bundled SmolLM2 tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from strata.app.output.processor import CompletionUpdate, OutputProcessor, RequestProcessor
from strata.engine_protocol import EngineRequest, RequestDelta, TokenLogprobs
from strata.sampling_params import SamplingParams
from tests.tokenizer_helpers import EOS, TEXT, _ids


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def processor(tok) -> OutputProcessor:
    return OutputProcessor(tok)


def _start(processor: OutputProcessor, tok, **params) -> RequestProcessor:
    prompt = "Once upon a time"
    return processor.start("req", prompt, tok.encode(prompt), SamplingParams(**params))


def _one_per_step(child_id: str, ids: list[int], finish: str | None = "length",
                  stop_reason: int | None = None) -> list[RequestDelta]:
    """One delta per token, as a decode step gives; the last carries the engine's finish."""
    deltas = [RequestDelta(child_id, token_ids=[t]) for t in ids]
    deltas[-1].finish_reason, deltas[-1].stop_reason = finish, stop_reason
    return deltas


def _feed(rp: RequestProcessor, deltas: list[RequestDelta], released: str = "") -> list[CompletionUpdate | None]:
    """Feeds one completion's deltas; `released`: what earlier updates of it released."""
    updates = []
    for d in deltas:
        updates.append(rp.process(d))
        # What went out in updates is exactly the cumulative output (held text in neither), so
        # released text is never taken back.
        assert rp.output().outputs[0].text == released + _streamed(updates)
    return updates


def _streamed(updates) -> str:
    return "".join(u.text for u in updates if u is not None)


# ---- plain runs ----


@pytest.mark.parametrize("text", [TEXT, "café 日本語 🚀 done", " leading space, then ünïcödé"])
def test_plain_run_text_equals_full_decode(processor, tok, text) -> None:
    ids = _ids(tok, text)
    rp = _start(processor, tok, max_tokens=len(ids))
    updates = _feed(rp, _one_per_step("req", ids))
    out = rp.output()
    assert out.finished and rp.finished
    done = out.outputs[0]
    assert done.text == tok.decode(ids, skip_special_tokens=True)
    assert _streamed(updates) == done.text
    assert all("\ufffd" not in u.text for u in updates)  # split characters come out whole
    assert [t for u in updates for t in u.token_ids] == ids == done.token_ids
    assert (done.finish_reason, done.stop_reason) == ("length", None)
    assert done.logprobs is None and done.cumulative_logprob is None
    assert out.request_id == "req" and out.prompt == "Once upon a time" and out.prompt_logprobs is None
    assert [u.finish_reason for u in updates] == [None] * (len(ids) - 1) + ["length"]


def test_several_tokens_in_one_delta(processor, tok) -> None:
    ids = _ids(tok, TEXT)
    rp = _start(processor, tok)
    updates = _feed(rp, [RequestDelta("req", token_ids=ids[:5]),
                         RequestDelta("req", token_ids=ids[5:], finish_reason="length")])
    assert updates[0].token_ids == ids[:5] and updates[1].token_ids == ids[5:]
    assert rp.output().outputs[0].text == TEXT == _streamed(updates)


def test_abort_delta_without_tokens_finishes(processor, tok) -> None:
    ids = _ids(tok, "Hello world")
    rp = _start(processor, tok)
    _feed(rp, _one_per_step("req", ids, finish=None))
    assert not rp.finished
    update = rp.process(RequestDelta("req", finish_reason="abort"))
    assert update.finish_reason == "abort" and update.token_ids == [] and rp.finished
    assert rp.output().outputs[0].text == "Hello world"


def test_unknown_child_is_refused(processor, tok) -> None:
    rp = _start(processor, tok)
    with pytest.raises(ValueError, match="not a completion"):
        rp.process(RequestDelta("someone-else", token_ids=[1]))


# ---- stop strings ----


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(processor, tok, include) -> None:
    ids = _ids(tok, TEXT)  # ... ' quick', ' brown', ' fox' ...: "ck bro" spans two tokens, mid-token
    rp = _start(processor, tok, stop=["nomatch", "ck bro"], include_stop_str_in_output=include)
    updates = _feed(rp, _one_per_step("req", ids))
    brown = ids.index(_ids(tok, " brown")[0])
    hit = updates[brown]
    assert hit.stopped_by_string and (hit.finish_reason, hit.stop_reason) == ("stop", "ck bro")
    assert all(u is None for u in updates[brown + 1:])  # tokens the engine ran on are ignored
    assert not any(u.stopped_by_string for u in updates[:brown])
    done = rp.output().outputs[0]
    assert done.text == ("Hello world! The quick bro" if include else "Hello world! The qui")
    assert _streamed(updates) == done.text
    assert done.token_ids == ids[: brown + 1]  # the token that completed the stop string stays
    assert (done.finish_reason, done.stop_reason) == ("stop", "ck bro") and rp.finished


def test_stop_string_drops_the_rest_of_its_delta(processor, tok) -> None:
    ids = _ids(tok, TEXT)
    rp = _start(processor, tok, stop=["brown"], logprobs=0)
    brown = ids.index(_ids(tok, " brown")[0])
    lps = [TokenLogprobs(-0.5, 1) for _ in ids]
    update = rp.process(RequestDelta("req", token_ids=ids, logprobs=lps))
    assert update.stopped_by_string and update.token_ids == ids[: brown + 1]
    assert len(update.logprobs) == brown + 1
    done = rp.output().outputs[0]
    assert done.text == "Hello world! The quick " and done.token_ids == ids[: brown + 1]
    assert done.cumulative_logprob == pytest.approx(-0.5 * (brown + 1))


def test_hold_back_of_a_possible_stop_string(processor, tok) -> None:
    text = "Hello world! The quick brown fox over the lazy dog"
    ids = _ids(tok, text)
    rp = _start(processor, tok, stop=["fox jumps"])
    fox = ids.index(_ids(tok, " fox")[0])
    updates = _feed(rp, _one_per_step("req", ids[: fox + 1], finish=None))
    running = rp.output().outputs[0]
    assert running.text == "Hello world! The quick brown " == _streamed(updates)  # "fox" is held
    more = _feed(rp, _one_per_step("req", ids[fox + 1:], finish=None), _streamed(updates))
    assert more[0].text == "fox over"  # not a stop after all: released, with the new text
    # A tail that may still become "fox jumps" is held until the end, then released.
    rp2 = _start(processor, tok, stop=["dog!"])
    ups = _feed(rp2, _one_per_step("req", ids, finish=None))
    assert rp2.output().outputs[0].text == "Hello world! The quick brown fox over the lazy "
    last = rp2.process(RequestDelta("req", finish_reason="length"))
    assert last.text == "dog" and _streamed([*ups, last]) == text == rp2.output().outputs[0].text
    assert (last.finish_reason, last.stop_reason, last.stopped_by_string) == ("length", None, False)


def test_held_prefix_that_becomes_a_stop_is_never_released(processor, tok) -> None:
    ids = _ids(tok, TEXT)
    rp = _start(processor, tok, stop=["fox jumps"])
    updates = _feed(rp, _one_per_step("req", ids))
    assert rp.output().outputs[0].text == "Hello world! The quick brown " == _streamed(updates)
    assert rp.output().outputs[0].stop_reason == "fox jumps"


def test_include_stop_string_holds_nothing_back(processor, tok) -> None:
    ids = _ids(tok, TEXT)
    rp = _start(processor, tok, stop=["fox jumps"], include_stop_str_in_output=True)
    fox = ids.index(_ids(tok, " fox")[0])
    first = _feed(rp, _one_per_step("req", ids[: fox + 1], finish=None))
    assert rp.output().outputs[0].text == "Hello world! The quick brown fox"
    _feed(rp, _one_per_step("req", ids[fox + 1:]), _streamed(first))
    assert rp.output().outputs[0].text == "Hello world! The quick brown fox jumps"


def test_min_tokens_delays_stop_strings(processor, tok) -> None:
    ids = _ids(tok, "Hello world! The world is round.")  # "world" is token 2 and token 5
    early = _start(processor, tok, stop=["world"])
    _feed(early, _one_per_step("req", ids))
    assert early.output().outputs[0].text == "Hello "
    late = _start(processor, tok, stop=["world"], min_tokens=5)
    updates = _feed(late, _one_per_step("req", ids))
    assert updates[4].stopped_by_string and all(u is None for u in updates[5:])
    assert late.output().outputs[0].text == "Hello world! The "
    assert late.output().outputs[0].token_ids == ids[:5]


# ---- eos and stop ids (the engine's finish) ----


@pytest.mark.parametrize("include", [False, True])
def test_eos_text_only_when_included(processor, tok, include) -> None:
    ids = _ids(tok, "Hello world") + [EOS]
    # skip_special_tokens=False, so the eos token has text at all.
    rp = _start(processor, tok, include_stop_str_in_output=include, skip_special_tokens=False)
    updates = _feed(rp, _one_per_step("req", ids, finish="stop"))
    done = rp.output().outputs[0]
    assert done.text == ("Hello world<|im_end|>" if include else "Hello world") == _streamed(updates)
    assert done.token_ids == ids and (done.finish_reason, done.stop_reason) == ("stop", None)
    assert not updates[-1].stopped_by_string  # the engine finished it itself


def test_eos_with_skip_special_tokens_has_no_text(processor, tok) -> None:
    ids = _ids(tok, "Hello world") + [EOS]
    rp = _start(processor, tok, include_stop_str_in_output=True)
    _feed(rp, _one_per_step("req", ids, finish="stop"))
    assert rp.output().outputs[0].text == "Hello world" == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_id(processor, tok, include) -> None:
    ids = _ids(tok, "Hello world!")
    rp = _start(processor, tok, stop_token_ids=[ids[-1]], include_stop_str_in_output=include)
    _feed(rp, _one_per_step("req", ids, finish="stop", stop_reason=ids[-1]))
    done = rp.output().outputs[0]
    assert done.text == ("Hello world!" if include else "Hello world")
    assert (done.finish_reason, done.stop_reason) == ("stop", ids[-1])


def test_engine_stop_wins_over_a_stop_string_on_the_same_token(processor, tok) -> None:
    ids = _ids(tok, "Hello world!")
    rp = _start(processor, tok, stop=["!"], stop_token_ids=[ids[-1]])
    update = _feed(rp, _one_per_step("req", ids, finish="stop", stop_reason=ids[-1]))[-1]
    assert (update.stop_reason, update.stopped_by_string) == (ids[-1], False)
    assert rp.output().outputs[0].text == "Hello world"


def test_stop_string_wins_over_length_on_the_same_token(processor, tok) -> None:
    ids = _ids(tok, "Hello world!")
    rp = _start(processor, tok, stop=["world"], max_tokens=2)
    update = _feed(rp, _one_per_step("req", ids[:2], finish="length"))[-1]
    assert (update.finish_reason, update.stop_reason, update.stopped_by_string) == ("stop", "world", True)
    assert rp.output().outputs[0].text == "Hello "


# ---- n fan-out ----


def test_n_fan_out(processor, tok) -> None:
    params = SamplingParams(n=3, seed=7, prompt_logprobs=2, temperature=0.8)
    rp = processor.start("r", "Once upon a time", tok.encode("Once upon a time"), params)
    reqs = rp.engine_requests
    assert [r.request_id for r in reqs] == ["r-0", "r-1", "r-2"]
    assert [r.params.seed for r in reqs] == [7, 8, 9]
    assert [r.params.n for r in reqs] == [1, 1, 1]
    assert [r.params.prompt_logprobs for r in reqs] == [2, None, None]  # the prompt is shared
    assert all(r.prompt_token_ids == tok.encode("Once upon a time") for r in reqs)
    assert all(r.params.temperature == 0.8 for r in reqs)
    assert params.n == 3 and params.seed == 7 and params.prompt_logprobs == 2  # the caller's object

    texts = ["Hello world", "The quick brown fox", "lazy dog."]
    for i, text in enumerate(texts):
        assert not rp.finished
        updates = _feed_child(rp, f"r-{i}", _ids(tok, text))
        assert {u.index for u in updates} == {i} and {u.request_id for u in updates} == {"r"}
    assert rp.finished
    out = rp.output()
    assert [c.index for c in out.outputs] == [0, 1, 2] and [c.text for c in out.outputs] == texts


def _feed_child(rp: RequestProcessor, child: str, ids: list[int]) -> list[CompletionUpdate]:
    return [rp.process(d) for d in _one_per_step(child, ids)]


def test_n_fan_out_without_seed_and_single(processor, tok) -> None:
    rp = processor.start("r", None, [1, 2, 3], SamplingParams(n=2))
    assert [(r.request_id, r.params.seed) for r in rp.engine_requests] == [("r-0", None), ("r-1", None)]
    one = processor.start("r", None, [1, 2, 3], SamplingParams(seed=5, prompt_logprobs=1))
    (only,) = one.engine_requests
    assert isinstance(only, EngineRequest)
    assert (only.request_id, only.params.seed, only.params.prompt_logprobs, only.params.n) == ("r", 5, 1, 1)


# ---- logprobs ----


def test_logprobs_dicts_and_decoded_tokens(processor, tok) -> None:
    ids = _ids(tok, "Hello world!")
    alt_a, alt_b = _ids(tok, " the")[0], _ids(tok, " dog")[0]
    rp = _start(processor, tok, logprobs=2)
    entries = [
        TokenLogprobs(-0.1, 1, [(ids[0], -0.1), (alt_a, -2.0)]),  # chosen is the best: listed once
        TokenLogprobs(-1.5, 3, [(alt_a, -0.7), (alt_b, -1.2)]),  # chosen outside the top-2
        TokenLogprobs(-0.3, 2, [(alt_b, -0.2), (ids[2], -0.3)]),
    ]
    updates = [rp.process(RequestDelta("req", token_ids=[t], logprobs=[e],
                                       finish_reason="length" if i == 2 else None))
               for i, (t, e) in enumerate(zip(ids, entries, strict=True))]
    done = rp.output().outputs[0]
    assert done.cumulative_logprob == pytest.approx(-0.1 - 1.5 - 0.3)
    assert [u.logprobs for u in updates] == [[p] for p in done.logprobs]
    first, second, third = done.logprobs
    assert list(first) == [ids[0], alt_a]
    assert (first[ids[0]].logprob, first[ids[0]].rank, first[alt_a].rank) == (-0.1, 1, 2)
    assert list(second) == [ids[1], alt_a, alt_b]  # chosen first, then the top-k
    assert (second[ids[1]].rank, second[alt_a].rank, second[alt_b].rank) == (3, 1, 2)
    assert list(third) == [ids[2], alt_b] and third[ids[2]].rank == 2 and third[alt_b].logprob == -0.2
    for position in done.logprobs:
        for tid, lp in position.items():
            assert lp.decoded_token == tok.decode([tid])


def test_prompt_logprobs_assembly(processor, tok) -> None:
    prompt = tok.encode("Once upon a time")  # 4 tokens
    rp = processor.start("req", "Once upon a time", prompt, SamplingParams(prompt_logprobs=1))
    other = _ids(tok, " dog")[0]
    chunk1 = [TokenLogprobs(-3.0, 5, [(other, -1.0)]), TokenLogprobs(-0.5, 1, [(prompt[2], -0.5)])]
    chunk2 = [TokenLogprobs(-2.0, 2, [(other, -1.5)])]
    assert rp.process(RequestDelta("req", prompt_logprobs=chunk1)).token_ids == []  # a prefill chunk
    rp.process(RequestDelta("req", token_ids=[EOS], prompt_logprobs=chunk2, finish_reason="stop"))
    plp = rp.output().prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    assert [next(iter(p)) for p in plp[1:]] == prompt[1:]  # the actual token first
    assert list(plp[1]) == [prompt[1], other] and (plp[1][prompt[1]].rank, plp[1][other].rank) == (5, 1)
    assert list(plp[2]) == [prompt[2]] and plp[2][prompt[2]].logprob == -0.5
    assert plp[3][prompt[3]].logprob == -2.0 and plp[3][other].decoded_token == tok.decode([other])
    assert all(lp.decoded_token == tok.decode([t]) for p in plp[1:] for t, lp in p.items())
    assert rp.output().outputs[0].logprobs is None  # logprobs were not asked for


def test_prompt_logprobs_only_from_child_zero(processor, tok) -> None:
    prompt = tok.encode("Once upon a time")
    rp = processor.start("r", None, prompt, SamplingParams(n=2, prompt_logprobs=0))
    entries = [TokenLogprobs(-1.0, 1) for _ in prompt[1:]]
    rp.process(RequestDelta("r-1", prompt_logprobs=entries))  # not child 0: not the request's
    assert rp.output().prompt_logprobs is None
    rp.process(RequestDelta("r-0", prompt_logprobs=entries))
    assert len(rp.output().prompt_logprobs) == len(prompt)


# ---- without a tokenizer ----


def test_without_tokenizer(tok) -> None:
    bare = OutputProcessor(None)
    ids = _ids(tok, "Hello world")
    rp = bare.start("req", None, [1, 2, 3], SamplingParams(include_stop_str_in_output=True))
    updates = [rp.process(d) for d in _one_per_step("req", ids + [EOS], finish="stop")]
    done = rp.output().outputs[0]
    assert done.text == "" and all(u.text == "" for u in updates)  # no text ...
    assert done.token_ids == ids + [EOS] and done.finish_reason == "stop"
    rp2 = bare.start("req", None, [1, 2, 3], SamplingParams(logprobs=1))
    rp2.process(RequestDelta("req", token_ids=[ids[0]], logprobs=[TokenLogprobs(-1.0, 1, [(7, -0.5)])],
                             finish_reason="length"))
    (position,) = rp2.output().outputs[0].logprobs
    assert list(position) == [ids[0], 7]
    assert all(lp.decoded_token is None for lp in position.values())  # ... and no decoded tokens
