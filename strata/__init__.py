"""Strata's user-facing API: the offline `LLM`, `SamplingParams`, and the engine's config."""

from strata.config import EngineConfig
from strata.outputs import CompletionOutput, Logprob, RequestOutput
from strata.sampling_params import SamplingParams
from strata.structured_outputs import StructuredOutputsParams


def __getattr__(name: str):
    # LLM pulls in torch and the engine; load it only when asked, so `import strata` stays light.
    if name == "LLM":
        from strata.app.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "EngineConfig", "RequestOutput", "CompletionOutput",
           "Logprob"]
