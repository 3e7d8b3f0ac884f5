"""The sampler's structured-output path on CPU: grammars compiled from the bundled tokenizer, the
bitmask applied to a grammar's rows only, matchers that follow the draws (async launches
included), the cache, and the compile errors the server turns into 400s."""

from __future__ import annotations

import json
import re

import pytest
import torch

from strata.distributed.sampler_options import SamplerOptions
from strata.model.grammar import CACHE_SIZE, GrammarCompiler
from strata.model.grammar_mask import GrammarState, apply_bitmask, fill_bitmask
from strata.model.sampler import Sampler, SequenceSamplingState
from strata.structured_outputs import GrammarSpec, StructuredOutputsParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def compiler(tokenizer) -> GrammarCompiler:
    return GrammarCompiler.from_tokenizer(tokenizer, 49152, [EOS])


def structured_state(compiler, spec: GrammarSpec, **options) -> SequenceSamplingState:
    o = SamplerOptions(grammar_kind=spec.kind, grammar_spec=spec.spec, stop_token_ids=[EOS], **options)
    state = SequenceSamplingState(o, [1, 2, 3])
    state.grammar = GrammarState(compiler.compile(spec), o.stop_token_ids)
    return state


def allowed_ids(compiler, spec: GrammarSpec) -> set[int]:
    state = GrammarState(compiler.compile(spec), [EOS])
    mask = torch.zeros(1, -(-49152 // 32), dtype=torch.int32)
    state.fill(mask, 0)
    return {t for t in range(49152) if (int(mask[0, t // 32]) >> (t % 32)) & 1}


def test_plain_row_untouched_structured_row_allowed_only(compiler, tokenizer):
    spec = GrammarSpec("regex", "(yes|no)")
    allowed = allowed_ids(compiler, spec)
    assert allowed and len(allowed) < 100
    torch.manual_seed(0)
    logits = torch.randn(2, 49152) * 5
    before = logits.clone()
    plain = SequenceSamplingState(SamplerOptions(temperature=0.0, logprobs=3), [1, 2, 3])
    structured = structured_state(compiler, spec, temperature=0.0, logprobs=3)
    both = Sampler().sample(logits, [plain, structured])
    assert torch.equal(logits, before), "the caller's logits are never edited"
    alone = Sampler().sample(logits[:1].clone(), [SequenceSamplingState(SamplerOptions(temperature=0.0, logprobs=3),
                                                                         [1, 2, 3])])
    assert both[0] == alone[0], "the plain row samples and reports as if alone"
    assert both[0].token_id == int(logits[0].argmax())
    assert both[1].token_id in allowed
    best = max(allowed, key=lambda t: float(logits[1, t]))
    assert both[1].token_id == best, "greedy over the allowed ids"
    # Its logprobs are those of the masked distribution (vLLM's): only allowed ids are reported.
    assert {t for t, _ in both[1].top_logprobs} <= allowed


def test_random_rows_sample_only_allowed(compiler):
    spec = GrammarSpec("choice", json.dumps(["alpha", "beta", "gamma"]))
    allowed = allowed_ids(compiler, spec)
    states = [structured_state(compiler, spec, temperature=1.5, seed=s) for s in range(16)]
    states += [SequenceSamplingState(SamplerOptions(temperature=1.5, seed=s), [1]) for s in range(4)]
    out = Sampler().sample(torch.randn(20, 49152), states)
    assert all(o.token_id in allowed for o in out[:16])
    assert any(o.token_id not in allowed for o in out[16:])


def run_greedy(compiler, tokenizer, spec: GrammarSpec, steps: int = 40, async_reads: bool = False) -> str:
    """Greedy decoding of random logits under the grammar until eos; `async_reads`: every draw is
    launched before the last one is read (the matcher reads the earlier draw's ids itself)."""
    gen = torch.Generator().manual_seed(1)
    state = structured_state(compiler, spec, temperature=0.0)
    sampler, pending = Sampler(), None
    for _ in range(steps):
        draws = sampler.launch(torch.randn(1, 49152, generator=gen), [state])
        if async_reads:
            if pending is not None:
                state.output_token_ids.append(pending.tokens()[0].token_id)
            pending = draws
            last = int(draws.token_ids[0])
        else:
            last = draws.tokens()[0].token_id
            state.output_token_ids.append(last)
        if last == EOS:
            break
    if pending is not None:
        state.output_token_ids.append(pending.tokens()[0].token_id)
    assert state.output_token_ids[-1] == EOS, "the grammar's end allows only eos, which ends the request"
    return tokenizer.decode(state.output_token_ids[:-1])


@pytest.mark.parametrize("async_reads", [False, True])
def test_greedy_random_logits_follow_regex_and_end(compiler, tokenizer, async_reads):
    text = run_greedy(compiler, tokenizer, GrammarSpec("regex", r"[a-c]{2,5}-[0-9]{3}"), async_reads=async_reads)
    assert re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", text), text


def test_greedy_random_logits_follow_schema(compiler, tokenizer):
    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "k": {"enum": ["x", "y"]}}, "required": ["n", "k"]}
    text = run_greedy(compiler, tokenizer, GrammarSpec("json", json.dumps(schema), any_whitespace=False), steps=60)
    jsonschema.validate(json.loads(text), schema)


def test_broken_or_terminated_rows_allow_only_stop_tokens():
    state = GrammarState(None, [EOS, 7])
    mask = torch.zeros(1, 1536, dtype=torch.int32)
    state.fill(mask, 0)
    x = torch.zeros(1, 49152)
    apply_bitmask(x, torch.cat([torch.tensor([0], dtype=torch.int32), mask.view(-1)]), 1)
    assert torch.isfinite(x[0]).nonzero().view(-1).tolist() == [EOS, 7]


def test_bitmask_bit_31_and_vocab_past_the_mask():
    states = [SequenceSamplingState(SamplerOptions(), [1])]
    states[0].grammar = GrammarState(None, [31, 63])
    packed = fill_bitmask(states, [0], 64, [0])
    x = torch.zeros(1, 70)  # logits wider than the grammar's vocabulary: the extra ids are masked
    apply_bitmask(x, packed, 1)
    assert torch.isfinite(x[0]).nonzero().view(-1).tolist() == [31, 63]


def test_cache_hits_and_evicts(tokenizer):
    compiler = GrammarCompiler.from_tokenizer(tokenizer, 49152, [EOS])
    first = compiler.compile(GrammarSpec("regex", "a+"))
    assert compiler.compile(GrammarSpec("regex", "a+")) is first
    for i in range(CACHE_SIZE):
        compiler.compile(GrammarSpec("regex", f"b{{{i + 1}}}"))
    assert len(compiler) == CACHE_SIZE
    assert compiler.compile(GrammarSpec("regex", "a+")) is not first, "the oldest was evicted"


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec("json", '{"type": "objectx"}'), "invalid json schema: Unsupported type"),
    (GrammarSpec("json", "{not json"), "invalid json schema: Failed to parse JSON"),
    (GrammarSpec("regex", "(ab"), "invalid regex: Regex parsing error"),
    (GrammarSpec("grammar", "root ::= foo"), "invalid grammar: EBNF parser error"),
])
def test_compile_errors_are_value_errors(compiler, spec, words):
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        compiler.compile(spec)
    assert ".cc:" not in str(info.value), "no C++ source positions in a client's error"


@pytest.mark.parametrize("kwargs, words", [
    ({}, "none are specified"),
    ({"json": {}, "regex": "a"}, "multiple are specified"),
    ({"choice": []}, "choice must be a non-empty list"),
    ({"choice": "ab"}, "choice must be a non-empty list"),
    ({"regex": ""}, "regex must be a non-empty string"),
    ({"json": 3}, "json must be a JSON schema"),
    ({"json_object": False}, "json_object must be true"),
    ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern is not supported"),
    ({"structural_tag": "{}"}, "structural_tag is not supported"),
])
def test_structured_outputs_params_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_carry_the_spec():
    from strata.sampling_params import SamplingParams

    so = StructuredOutputsParams(json={"type": "integer"}, disable_any_whitespace=True)
    p = SamplingParams(structured_outputs=so)
    o = SamplerOptions.from_params(p, [EOS])
    assert o.grammar() == GrammarSpec("json", '{"type": "integer"}', any_whitespace=False)
    assert SamplingParams(structured_outputs={"choice": ["a", "b"]}).structured_outputs.choice == ["a", "b"]
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"nope": 1})
    with pytest.raises(ValueError, match="structured_outputs must be"):
        SamplingParams(structured_outputs="a")
    assert SamplerOptions.from_params(SamplingParams(), [EOS]).grammar() is None
