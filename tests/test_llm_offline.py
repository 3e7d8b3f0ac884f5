"""The offline LLM driving the output processor over a fake engine (no model, no Ray), on the
bundled SmolLM2 tokenizer."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from strata.engine_protocol import EngineInfo, EngineRequest, RequestDelta
from strata.sampling_params import SamplingParams
from tests.tokenizer_helpers import EOS, TEXT, _ids


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


# ---- the offline LLM over a fake engine ----


class FakeEngine:
    """The Engine protocol on CPU: every request generates SCRIPT's ids one per step, to its
    max_tokens ("length"), or to eos ("stop")."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.info = EngineInfo(max_model_len=64, num_blocks=8, block_size=16, max_num_seqs=8,
                               max_logprobs=20, vocab_size=49152, ranks=[{"rank": 0, "device": "cpu"}])
        self.batches: list[list[EngineRequest]] = []
        self.aborted: list[str] = []
        self.closed = False
        self.shut_down = 0

    async def generate_batch(self, requests):
        self.batches.append(requests)
        pos = {r.request_id: 0 for r in requests}
        limits = {r.request_id: r.params.max_tokens or 10**9 for r in requests}
        try:
            while pos:
                step = []
                for rid in list(pos):
                    if rid in self.aborted:
                        step.append(RequestDelta(rid, finish_reason="abort"))
                        del pos[rid]
                        continue
                    tok = self.script[pos[rid]]
                    pos[rid] += 1
                    delta = RequestDelta(rid, token_ids=[tok])
                    if tok == EOS:
                        delta.finish_reason = "stop"
                    elif pos[rid] >= limits[rid] or pos[rid] >= len(self.script):
                        delta.finish_reason = "length"
                    if delta.finished:
                        del pos[rid]
                    step.append(delta)
                yield step
                await asyncio.sleep(0)
        finally:
            self.closed = True

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def stats(self) -> dict:
        return {"num_running": 0}

    async def step_times(self):
        return [[(0.0, 1.0)]]

    def shutdown(self) -> None:
        self.shut_down += 1


@pytest.fixture
def fake_llm(monkeypatch, smollm2_dir, tok):
    import strata.app.llm as llm_module

    engine = FakeEngine(_ids(tok, TEXT) + [EOS])
    monkeypatch.setattr(llm_module, "start_engine", lambda config, facts: engine)
    llm = llm_module.LLM(smollm2_dir)
    yield llm, engine
    llm.shutdown()


def test_llm_over_the_engine_protocol(fake_llm, tok) -> None:
    llm, engine = fake_llm
    assert llm.max_model_len == 64 and llm.rank_facts() == [{"rank": 0, "device": "cpu"}]
    outs = llm.generate(["Once upon a time", {"prompt_token_ids": [1, 2, 3]}, [4, 5]],
                        [SamplingParams(max_tokens=4), SamplingParams(max_tokens=50, stop=["fox"]),
                         SamplingParams(n=2, seed=3, max_tokens=50)], use_tqdm=False)
    (requests,) = engine.batches
    assert requests[0].prompt_token_ids == tok.encode("Once upon a time")  # tokenized here
    assert [r.params.seed for r in requests[2:]] == [3, 4]
    assert outs[0].prompt == "Once upon a time" and outs[0].outputs[0].text == "Hello world! The"
    assert outs[0].outputs[0].finish_reason == "length"
    assert outs[1].outputs[0].text == "Hello world! The quick brown "
    assert outs[1].outputs[0].stop_reason == "fox"
    assert engine.aborted == [requests[1].request_id]  # the stop string ended it: the engine heard
    assert [c.text for c in outs[2].outputs] == [TEXT, TEXT] and outs[2].outputs[0].finish_reason == "stop"
    assert all(o.finished for o in outs) and engine.closed
    assert llm.stats() == {"num_running": 0} and llm.step_times() == [[(0.0, 1.0)]]


def test_llm_validates_every_prompt_first(fake_llm) -> None:
    llm, engine = fake_llm
    with pytest.raises(ValueError, match=r"^prompt 1: The prompt has 65 tokens, more than max_model_len=64"):
        llm.generate([[1, 2], list(range(65))], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 0: Token ids \[49152\]"):
        llm.generate([[49152]], use_tqdm=False)
    assert engine.batches == []  # nothing was queued
    assert llm.generate([], use_tqdm=False) == []


def test_llm_compiles_structured_outputs_at_admission(fake_llm) -> None:
    from strata import StructuredOutputsParams

    llm, engine = fake_llm
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "objectx"}))
    with pytest.raises(ValueError, match=r"^prompt 1: structured_outputs.json: invalid json schema: Unsupported type"):
        llm.generate([[1, 2], [3]], [SamplingParams(), bad], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt 0: structured_outputs.regex: invalid regex"):
        llm.generate([[1]], SamplingParams(structured_outputs=StructuredOutputsParams(regex="(a")), use_tqdm=False)
    assert engine.batches == []  # nothing was queued
    good = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    llm.generate([[1, 2]], good, use_tqdm=False)
    (requests,) = engine.batches
    assert requests[0].params.structured_outputs.choice == ["yes", "no"]


def test_llm_chat_applies_the_template_here(fake_llm, tok) -> None:
    llm, engine = fake_llm
    conv = [{"role": "user", "content": "hi"}]
    (out,) = llm.chat(conv, SamplingParams(max_tokens=2), use_tqdm=False)
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt == text
    assert engine.batches[0][0].prompt_token_ids == tok.encode(text, add_special_tokens=False)
    assert out.outputs[0].text == "Hello world"
    assert llm.get_tokenizer() is llm.get_tokenizer()


def test_llm_works_under_a_running_loop(fake_llm) -> None:
    llm, _ = fake_llm

    async def inside() -> str:
        return llm.generate([[1]], SamplingParams(max_tokens=1), use_tqdm=False)[0].outputs[0].text

    assert asyncio.run(inside()) == "Hello"


def test_llm_shutdown_is_idempotent(fake_llm) -> None:
    llm, engine = fake_llm
    with llm:
        pass
    llm.shutdown()
    assert engine.shut_down == 1
    with pytest.raises(RuntimeError, match="shut down"):
        llm.stats()


def test_llm_progress_bar(fake_llm, capsys) -> None:
    llm, _ = fake_llm
    outs = llm.generate([[1], [2]], SamplingParams(max_tokens=1))
    assert [o.outputs[0].text for o in outs] == ["Hello", "Hello"]
    assert "Processed prompts" in capsys.readouterr().err
