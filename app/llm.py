"""`LLM`: the offline API, shaped like vLLM's.

    from strata import LLM, SamplingParams
    llm = LLM()                                   # the bundled SmolLM2-135M-Instruct
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=32))
    print(out[0].outputs[0].text)
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from strata.app.driver_handle import start_driver
from strata.app.model_source import preflight
from tqdm import tqdm

from strata.config import EngineConfig, describe_validation_error
from strata.outputs import RequestOutput
from strata.sampling_params import SamplingParams

logger = logging.getLogger("strata")

PromptType = str | dict[str, Any] | list[int]


class LLM:
    """Loads a model across `tensor_parallel_size x pipeline_parallel_size` ranks and generates.

    Every keyword is an EngineConfig field (see app/config.py); unknown or invalid ones raise
    ValueError naming the argument and what is allowed, before anything starts.
    """

    def __init__(self, model: str | None = None, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, distributed_executor_backend: str = "auto",
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, block_size: int = 16,
                 seed: int = 0, load_format: str = "auto", **kwargs: Any):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            self.config = EngineConfig(
                model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                distributed_executor_backend=distributed_executor_backend, dtype=dtype,
                max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                block_size=block_size, seed=seed, load_format=load_format, **kwargs,
            )
        except ValidationError as err:
            raise ValueError(describe_validation_error(err)) from None
        self.facts = preflight(self.config)
        logger.info("model: %s (%s, %d layers)", self.facts.model_dir, self.facts.architecture,
                    self.facts.num_layers)
        self._driver = start_driver(self.config, self.facts)
        self.max_model_len: int = self._driver.info["max_model_len"]
        self._tokenizer = None

    # ---- generation ----

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in input order. Prompts: strings, {"prompt": str} / {"prompt_token_ids": [...]},
        or token-id lists; one SamplingParams for all or one per prompt."""
        items = _normalise_prompts(prompts)
        params = _per_prompt_params(sampling_params, len(items))
        requests = [(f"offline-{uuid.uuid4().hex[:12]}", text, ids, p)
                    for (text, ids), p in zip(items, params, strict=True)]
        results: list[RequestOutput | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            for index, output in self._driver.stream("generate_batch", requests):
                results[index] = output
                bar.update(1)
        return results  # type: ignore[return-value]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._driver.call("apply_chat_template", conv, add_generation_prompt, chat_template)
                   for conv in conversations]
        # The template already holds the special tokens (bos etc.), so do not add them again.
        token_ids = [{"prompt_token_ids": self._driver.call("encode", p, False), "prompt": p} for p in prompts]
        return self.generate(token_ids, sampling_params, use_tqdm)

    def get_tokenizer(self):
        if self._tokenizer is None:
            from strata.app.model_source import load_tokenizer

            self._tokenizer = load_tokenizer(self.facts)
        return self._tokenizer

    # ---- introspection and lifecycle ----

    def stats(self) -> dict:
        return self._driver.call("stats")

    def rank_facts(self) -> list[dict]:
        return self._driver.info["ranks"]

    def step_times(self) -> list[list[tuple[float, float]]]:
        return self._driver.call("step_times")

    def shutdown(self) -> None:
        if self._driver is not None:
            self._driver.shutdown()
            self._driver = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def _normalise_prompts(prompts) -> list[tuple[str | None, list[int] | None]]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            items.append((p, None))
        elif isinstance(p, dict) and ("prompt_token_ids" in p or "prompt" in p):
            ids = p.get("prompt_token_ids")
            items.append((p.get("prompt"), list(ids) if ids is not None else None))
        elif isinstance(p, list) and all(isinstance(t, int) for t in p):
            items.append((None, list(p)))
        else:
            raise ValueError(f"prompt {i} must be a string, a list of token ids, or a dict with "
                             f"'prompt' or 'prompt_token_ids'; got {type(p).__name__}")
    return items


def _per_prompt_params(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; pass one, or one per prompt")
    return params
