"""SamplerOptions: what the sampling rank needs of a request's SamplingParams, in plain types.

The driver derives it once per request; it travels to the ranks inside the step plan's
announcement of a sequence (strata.distributed.step_plan.NewSequence) as a plain dict, and the
sampling rank's sampler (strata.model.sampler) reads it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.sampling_params import SamplingParams
from strata.structured_outputs import GrammarSpec


@dataclass
class SamplerOptions:
    """What the sampler needs of a request's SamplingParams.

    Plain ints, floats and lists so it travels as msgpack: `dataclasses.asdict(opts)` out,
    `SamplerOptions(**d)` in. `top_k` 0 means off. `stop_token_ids` already includes eos unless the
    request ignores eos; they are only masked here (while output is shorter than `min_tokens`),
    stopping is the driver's job. `grammar_kind` ("" when none), `grammar_spec` and
    `grammar_any_whitespace` are the request's structured-output constraint
    (strata.structured_outputs.GrammarSpec), which the sampling rank compiles.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # logit_bias as two parallel lists (msgpack maps with int keys do not round-trip by default)
    bias_token_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    allowed_token_ids: list[int] = field(default_factory=list)  # empty: every token allowed
    banned_token_ids: list[int] = field(default_factory=list)  # bad_words of one token, resolved to ids
    # bad_words of several tokens: the last id is banned where the output ends with the others
    banned_sequences: list[list[int]] = field(default_factory=list)
    logprob_token_ids: list[int] = field(default_factory=list)  # reported instead of the top-k
    grammar_kind: str = ""
    grammar_spec: str = ""
    grammar_any_whitespace: bool = True

    def grammar(self) -> GrammarSpec | None:
        return GrammarSpec(self.grammar_kind, self.grammar_spec, self.grammar_any_whitespace) if self.grammar_kind \
            else None  # type: ignore[arg-type]

    @classmethod
    def from_params(cls, params: SamplingParams, eos_token_ids: list[int] | tuple[int, ...]) -> SamplerOptions:
        """The subset of a request's SamplingParams the sampling rank needs, in plain types."""
        spec = params.structured_outputs.to_spec() if params.structured_outputs is not None else None
        return cls(
            temperature=0.0 if params.is_greedy else float(params.temperature),
            top_p=float(params.top_p),
            top_k=max(params.top_k, 0),  # -1 and 0 both mean off; the sampler knows only 0
            min_p=float(params.min_p),
            seed=params.seed,
            presence_penalty=float(params.presence_penalty),
            frequency_penalty=float(params.frequency_penalty),
            repetition_penalty=float(params.repetition_penalty),
            min_tokens=params.min_tokens,
            stop_token_ids=params.all_stop_token_ids(list(eos_token_ids)),
            logprobs=params.logprobs,
            prompt_logprobs=params.prompt_logprobs,
            bias_token_ids=list((params.logit_bias or {}).keys()),
            bias_values=[float(v) for v in (params.logit_bias or {}).values()],
            allowed_token_ids=list(params.allowed_token_ids or []),
            banned_token_ids=list(params.bad_words_token_ids or []),
            banned_sequences=[list(ids) for ids in params.bad_word_sequences],
            logprob_token_ids=list(params.logprob_token_ids or []),
            grammar_kind=spec.kind if spec else "",
            grammar_spec=spec.spec if spec else "",
            grammar_any_whitespace=spec.any_whitespace if spec else True,
        )
