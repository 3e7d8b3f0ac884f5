"""Strata's user-facing API: the offline `LLM`, `SamplingParams`, and the engine's config."""

from app.config import EngineConfig
from app.outputs import CompletionOutput, Logprob, RequestOutput
from app.sampling_params import SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and the engine; load it only when asked, so `import app` stays light.
    if name == "LLM":
        from app.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput", "Logprob"]
